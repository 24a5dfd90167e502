--[[
  Append tasks to one stream's pending list (optionally deduplicated) and make the
  stream claimable.

  Input:
    KEYS[1]      pending list of the stream
    KEYS[2]      ready set of the stream's queue in this shard (member: stream, score: ms)
    KEYS[3]      queue index of the shard
    KEYS[4]      layout key of the shard (its shard count)
    KEYS[5..]    one dedup key per task, only when deduplication is asked for
    ARGV[1]      stream name
    ARGV[2]      wake-up channel
    ARGV[3]      shard number (published on the wake-up channel)
    ARGV[4]      dedup window in ms (used when KEYS[5..] are given)
    ARGV[5]      the caller's shard count
    ARGV[6]      number of tasks n
    ARGV[7..]    n triples: task id (32 hex chars), expires-in ms (0: never), payload

  Output:
    without dedup keys, n (every task was appended: a per-task reply would only repeat the
    ids the caller sent); with them, a flat list of n pairs: task id, 1 if appended or 0 if a
    duplicate (the id is then the id of the task already accepted under that dedup key); an
    error reply, with nothing stored, when the shard is laid out with another shard count.

  Entries are stored as "<id>|<enqueued ms>|<expires ms or 0>|<payload>" so that scripts can
  read the id and the deadline without decoding the payload; both times are Redis's clock.
]]
local pending = KEYS[1]
local ready = KEYS[2]
local queues = KEYS[3]
local layout = KEYS[4]
local PUSH_SLICE = 1000
local refused = check_layout(layout, ARGV[5])
if refused then return refused end
local now = now_ms()
local stamp = string.format('|%.0f|', now)
local n = tonumber(ARGV[6])
local dedup = #KEYS > 4
local out = {}
local entries = {}
for i = 1, n do
  local base = 6 + (i - 1) * 3
  local id = ARGV[base + 1]
  local ttl = tonumber(ARGV[base + 2])
  local existing = false
  if dedup then
    if not redis.call('SET', KEYS[4 + i], id, 'NX', 'PX', ARGV[4]) then
      existing = redis.call('GET', KEYS[4 + i])
    end
    out[#out + 1] = existing or id
    out[#out + 1] = existing and 0 or 1
  end
  if not existing then
    local expires = '0|'
    if ttl > 0 then expires = string.format('%.0f|', now + ttl) end
    entries[#entries + 1] = id .. stamp .. expires .. ARGV[base + 3]
  end
end
-- One RPUSH per PUSH_SLICE entries: one command instead of one per task, and unpack() stays
-- within Lua's stack limit however many tasks a call carries.
for first = 1, #entries, PUSH_SLICE do
  redis.call('RPUSH', pending, unpack(entries, first, math.min(first + PUSH_SLICE - 1, #entries)))
end
local added = #entries
-- A leased stream already has a ready entry (scored at its lease expiry): NX leaves it alone,
-- and the holder sees the new task on its next fetch, so only a newly claimable stream wakes
-- idle workers.
if added > 0 and ready_set({ ready = ready, queues = queues, queue = queue_of(ARGV[1]) }, ARGV[1], now, 'NX') == 1 then
  wake(ARGV[2], ARGV[3])
end
if not dedup then return added end
return out
