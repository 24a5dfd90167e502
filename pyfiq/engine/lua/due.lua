--[[
  List streams of one shard that are claimable now, among the queues the caller consumes.

  Input:
    KEYS[1]      queue index of the shard (queue -> earliest claimable-at of its streams)
    KEYS[2]      layout key of the shard
    KEYS[3]      paused queues and streams of the shard
    ARGV[1]      how many candidates to return at most
    ARGV[2]      the caller's shard count
    ARGV[3]      how many due queues of the index to scan at most in this call
    ARGV[4]      offset into the due queues where this scan starts
    ARGV[5..]    logical queue names the caller consumes (none: every queue)

  Output:
    { ms until the earliest not-yet-due stream falls due (-1 if none known),
      offset to continue scanning from (0: the scan reached the end),
      stream, due-since ms, stream, due-since ms, ... } oldest first

  The cost follows the queues the caller consumes, never the backlog of other queues: a few
  consumed queues are looked up one by one in the index; many are matched against one bounded
  page of the index's due queues. Each queue's ready set ("<tag>:r:<queue>", same slot) is read
  only for a consumed queue with due streams. The shard's layout is asserted on the way (a
  write only when it is missing, as after an empty restart). Redis's clock is read only once a
  consumed queue is found in the index: most polls of an idle fleet find nothing, and TIME
  would be a third of their cost.
]]
local queues = KEYS[1]
local layout = KEYS[2]
local paused = KEYS[3]
local refused = check_layout(layout, ARGV[2])
if refused then return refused end
-- No queue of the shard has a stream (the common case of an idle fleet's polls): one read.
if redis.call('ZCARD', queues) == 0 then return { -1, 0 } end
local now = nil
local function clock()
  if not now then now = now_ms() end
  return now
end
local want = tonumber(ARGV[1])
local tag = string.sub(queues, 1, #queues - #':queues')
local nxt = -1
local function later(ms)
  if nxt < 0 or ms < nxt then nxt = ms end
end
local found = {}
local function collect(queue)
  if redis.call('SISMEMBER', paused, queue) == 1 then return end
  local ready = tag .. ':r:' .. queue
  local due = redis.call('ZRANGEBYSCORE', ready, '-inf', clock(), 'WITHSCORES', 'LIMIT', 0, want)
  for i = 1, #due, 2 do
    if redis.call('SISMEMBER', paused, due[i]) == 0 then found[#found + 1] = { tonumber(due[i + 1]), due[i] } end
  end
  -- The queue's index score is its earliest stream's, which may be due and paused: the first
  -- one not yet due (a lease's lapse, a delayed task) is read here, so it is looked at then.
  local first = redis.call('ZRANGEBYSCORE', ready, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first > 0 then later(tonumber(first[2]) - now) end
end
local offset = 0
local direct = #ARGV - 4
if direct > 0 and direct <= 64 then
  for i = 5, #ARGV do
    local score = redis.call('ZSCORE', queues, ARGV[i])
    if score then
      score = tonumber(score)
      if score <= clock() then collect(ARGV[i]) else later(score - now) end
    end
  end
else
  local accept = nil
  if direct > 0 then
    accept = {}
    for i = 5, #ARGV do accept[ARGV[i]] = true end
  end
  local budget = tonumber(ARGV[3])
  local start = tonumber(ARGV[4])
  local due_queues = redis.call('ZRANGEBYSCORE', queues, '-inf', clock(), 'LIMIT', start, budget)
  for _, queue in ipairs(due_queues) do
    if accept == nil or accept[queue] then collect(queue) end
  end
  if #due_queues == budget then offset = start + budget end
  local first = redis.call('ZRANGEBYSCORE', queues, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first > 0 then later(tonumber(first[2]) - now) end
end
table.sort(found, function(a, b) return a[1] < b[1] end)
local out = { nxt, offset }
for i = 1, math.min(want, #found) do
  out[#out + 1] = found[i][2]
  out[#out + 1] = found[i][1]
end
return out
