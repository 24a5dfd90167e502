--[[
  Record a worker's heartbeat in the replica registry, and tell it which replicas share the
  fleet's safety poll with it. Now and then forget a few long-silent replicas (a crashed process
  never says goodbye), so the registry stays small without a scan.

  Input:
    KEYS[1]      the replica registry (hash: replica id -> JSON)
    KEYS[2]      the pollers (sorted set, every score 0, so ordered by name: "<group>|<id>")
    ARGV[1]      replica id
    ARGV[2]      what the replica says of itself (a JSON object whose last field is "poll")
    ARGV[3]      ms of silence after which a replica is forgotten
    ARGV[4]      the replica's name among the pollers, "<group>|<id>" (group: hex digits)
    ARGV[5]      1 if the replica polls (it has a free slot), else 0
    ARGV[6]      ms of silence after which a poller counts as gone
    ARGV[7]      how many pollers of the group to consider at most
    ARGV[8]      1: join and read the pollers afresh; 0: check the caller's last view
    ARGV[9]      1: sweep a few registry entries for long-silent replicas
    ARGV[10..]   the caller's last view (poller names), checked when ARGV[8] is 0

  Output:
    { Redis ms, poller name, 1 if it polls now else 0, ... } in name order: the view. Only the
    Redis ms when the caller does not poll.

  A poller polls now if its last heartbeat is recent and says it still polls for the same group
  (the "poll" field, written last so it is found at the end of the JSON). Gone pollers are
  removed and the view read again; one that is merely busy removes itself on its next beat.
]]
local replicas = KEYS[1]
local pollers = KEYS[2]
local now = now_ms()
local id = ARGV[1]
redis.call('HSET', replicas, id, string.sub(ARGV[2], 1, -2) .. string.format(',"seen_ms":%.0f}', now))
if ARGV[9] == '1' then
  local forget = tonumber(ARGV[3])
  local sample = redis.call('HRANDFIELD', replicas, 3, 'WITHVALUES')
  for i = 1, #sample, 2 do
    local seen = string.match(sample[i + 1], '"seen_ms":(%d+)')
    if not seen or now - tonumber(seen) > forget then redis.call('HDEL', replicas, sample[i]) end
  end
end
local me = ARGV[4]
if ARGV[5] ~= '1' then
  redis.call('ZREM', pollers, me)
  return { now }
end
local cut = string.find(me, '|', 1, true)
local group = string.sub(me, 1, cut - 1)
local live = tonumber(ARGV[6])
local most = tonumber(ARGV[7])
local function read_view()
  return redis.call('ZRANGE', pollers, '[' .. group .. '|', '(' .. group .. '}', 'BYLEX', 'LIMIT', 0, most)
end
local view
if ARGV[8] == '1' then
  redis.call('ZADD', pollers, 'NX', 0, me)
  view = read_view()
else
  view = argv_slice(10, #ARGV - 9)
end
local out
for attempt = 1, 2 do
  out = { now }
  local gone = {}
  local bodies = {}
  if #view > 0 then
    local ids = {}
    for i, name in ipairs(view) do ids[i] = string.sub(name, #group + 2) end
    bodies = redis.call('HMGET', replicas, unpack(ids))
  end
  for i, name in ipairs(view) do
    local polls = 0
    local body = bodies[i]
    local said, seen
    if type(body) == 'string' then
      said, seen = string.match(string.sub(body, -64), '"poll":"(%x*)","seen_ms":(%d+)}$')
    end
    if name == me then
      polls = 1
    elseif not seen or now - tonumber(seen) > live or (said ~= group and said ~= '') then
      gone[#gone + 1] = name
    elseif said == group then
      polls = 1
    end
    out[#out + 1] = name
    out[#out + 1] = polls
  end
  if #gone == 0 or attempt == 2 then break end
  redis.call('ZREM', pollers, unpack(gone))
  view = read_view()
end
return out
