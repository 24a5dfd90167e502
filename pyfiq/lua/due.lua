--[[
  List streams of one shard that are claimable now (read only).

  Input:
    KEYS[1]      ready sorted set of the shard
    ARGV[1]      how many candidates to return at most
    ARGV[2]      how many due entries to scan at most in this call
    ARGV[3]      offset into the due entries where this scan starts
    ARGV[4..]    logical queue names the caller consumes (none: every queue)

  Output:
    { ms until the earliest not-yet-due stream falls due (-1 if none),
      offset to continue scanning from (0: the scan reached the end),
      stream, due-since ms, stream, due-since ms, ... } oldest first

  A stream's logical queue is its name up to the first '#'. Filtering here keeps a replica that
  consumes a few queues from being handed other replicas' streams; the offset lets it page past
  any number of due streams of queues it does not consume, one bounded call at a time.
]]
local now = now_ms()
local want = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local offset = tonumber(ARGV[3])
local accept = nil
if #ARGV > 3 then
  accept = {}
  for i = 4, #ARGV do accept[ARGV[i]] = true end
end
local out = { -1, 0 }
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', offset, budget)
local found = 0
local scanned = #due / 2
for i = 1, #due, 2 do
  local stream = due[i]
  local cut = string.find(stream, '#', 1, true)
  local queue = stream
  if cut then queue = string.sub(stream, 1, cut - 1) end
  if accept == nil or accept[queue] then
    out[#out + 1] = stream
    out[#out + 1] = due[i + 1]
    found = found + 1
    if found >= want then break end
  end
  if i + 1 == #due and scanned == budget then out[2] = offset + budget end
end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #later > 0 then out[1] = tonumber(later[2]) - now end
return out
