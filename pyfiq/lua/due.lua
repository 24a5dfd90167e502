--[[
  List streams of one shard that are claimable now (read only).

  Input:
    KEYS[1]      ready sorted set of the shard
    ARGV[1]      how many candidates to return at most
    ARGV[2]      how many due entries to scan at most
    ARGV[3..]    logical queue names the caller consumes (none: every queue)

  Output:
    { ms until the earliest not-yet-due stream falls due (-1 if none), stream, stream, ... }

  A stream's logical queue is its name up to the first '#'. Filtering here keeps a replica that
  consumes a few queues from being handed other replicas' streams.
]]
local now = now_ms()
local want = tonumber(ARGV[1])
local accept = nil
if #ARGV > 2 then
  accept = {}
  for i = 3, #ARGV do accept[ARGV[i]] = true end
end
local out = { -1 }
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, stream in ipairs(due) do
  local cut = string.find(stream, '#', 1, true)
  local queue = stream
  if cut then queue = string.sub(stream, 1, cut - 1) end
  if accept == nil or accept[queue] then
    out[#out + 1] = stream
    if #out > want then break end
  end
end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #later > 0 then out[1] = tonumber(later[2]) - now end
return out
