--[[
  Append tasks to one stream (optionally deduplicated): at once to its pending list, or, when
  delayed, to its later set until they fall due (see promote in lib.lua). Makes the stream
  claimable (now, or from the first due time).

  Input:
    KEYS[1]      pending list of the stream
    KEYS[2]      ready set of the stream's queue in this shard (member: stream, score: ms)
    KEYS[3]      queue index of the shard
    KEYS[4]      layout key of the shard (its shard count)
    KEYS[5]      delayed tasks of the stream (sorted set by due ms)
    KEYS[6]      the counter ordering delayed tasks
    KEYS[7]      lease key of the stream
    KEYS[8..]    one dedup key per task, only when deduplication is asked for
    ARGV[1]      stream name
    ARGV[2]      wake-up channel
    ARGV[3]      shard number (published on the wake-up channel)
    ARGV[4]      dedup window in ms (used when KEYS[8..] are given)
    ARGV[5]      the caller's shard count
    ARGV[6]      number of tasks n
    ARGV[7..]    n quadruples: task id (32 hex chars), expires-in ms (0: never), when, payload;
                 when: '0' now, '+<ms>' that many ms from now, '=<ms>' at that Redis time (ms
                 since the epoch); a due time not ahead of now is now

  Output:
    without dedup keys, n (every task was stored: a per-task reply would only repeat the ids
    the caller sent); with them, a flat list of n pairs: task id, 1 if stored or 0 if a
    duplicate (the id is then the id of the task already accepted under that dedup key); an
    error reply, with nothing stored, when the shard is laid out with another shard count
    (PYFIQLAYOUT) or not laid out at all (PYFIQUNLAID: the caller checks the layout of every
    shard of its count, writes this shard's and sends the call again).

  Entries are stored as "<id>|<enqueued ms>|<expires ms or 0>|<payload>" so that scripts can
  read the id and the deadline without decoding the payload; both times are Redis's clock, and
  a delayed task's deadline counts from its enqueue, as an immediate one's does.
]]
local pending = KEYS[1]
local ready = KEYS[2]
local queues = KEYS[3]
local layout = KEYS[4]
local later = KEYS[5]
local later_seq = KEYS[6]
local lease = KEYS[7]

-- The hot path, run before the helpers the rest uses are built (each is a closure made on every
-- call, see lib.lua):
-- immediate tasks, no dedup, for a stream that is already claimable or held and has no delayed
-- tasks. The general path would only append them here: its ZADD NX would change nothing, so
-- there is no wake-up to send, and no delayed task to move first. A layout that is missing or
-- another is the general path's to write or refuse.
local n = tonumber(ARGV[6])
if #KEYS == 7 and redis.call('ZSCORE', ready, ARGV[1]) and redis.call('EXISTS', later) == 0
    and redis.call('GET', layout) == ARGV[5] then
  local now = now_ms()
  local entries = {}
  for i = 1, n do
    local base = 6 + (i - 1) * 4
    if ARGV[base + 3] ~= '0' then
      entries = nil
      break
    end
    entries[i] = new_entry(ARGV[base + 1], tonumber(ARGV[base + 2]), ARGV[base + 4], now)
  end
  if entries then
    for first = 1, n, PUSH_SLICE do
      redis.call('RPUSH', pending, unpack(entries, first, math.min(first + PUSH_SLICE - 1, n)))
    end
    return n
  end
end

--[[ helpers ]]

local refused = check_layout(layout, ARGV[5], true)
if refused then return refused end
local now = now_ms()
local dedup = #KEYS > 7
local s = { pending = pending, later = later, later_seq = later_seq, lease = lease, ready = ready, queues = queues,
            stream = ARGV[1], channel = ARGV[2], shard = ARGV[3] }
local out = {}
local entries = {}
local delayed = {}
local stored = 0
for i = 1, n do
  local base = 6 + (i - 1) * 4
  local id = ARGV[base + 1]
  local ttl = tonumber(ARGV[base + 2])
  local existing = false
  if dedup then
    if not redis.call('SET', KEYS[7 + i], id, 'NX', 'PX', ARGV[4]) then
      existing = redis.call('GET', KEYS[7 + i])
    end
    out[#out + 1] = existing or id
    out[#out + 1] = existing and 0 or 1
  end
  if not existing then
    local entry = new_entry(id, ttl, ARGV[base + 4], now)
    local when = ARGV[base + 3]
    local due = now
    if when ~= '0' then
      due = tonumber(string.sub(when, 2)) or 0
      if string.sub(when, 1, 1) == '+' then due = now + due end
    end
    if due > now then
      delayed[#delayed + 1] = { entry, due }
    else
      entries[#entries + 1] = entry
    end
    stored = stored + 1
  end
end
-- Immediate tasks first: they join now, and a delayed task of this call joins later.
push(s, entries, now)
for _, task in ipairs(delayed) do postpone(s, task[1], task[2]) end
if not dedup then return stored end
return out
