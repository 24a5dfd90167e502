--[[
  Move dead-lettered tasks back to their stream's pending list (an operator action).

  Input:
    KEYS[1]      dead-letter list of the stream
    KEYS[2]      pending list
    KEYS[3]      ready sorted set of the shard
    KEYS[4]      dead-letter index set of the shard
    ARGV[1]      stream name
    ARGV[2]      wake-up channel
    ARGV[3]      shard number
    ARGV[4]      how many to move at most, oldest first
    ARGV[5]      'front' to put them before pending work, 'back' to append them
    ARGV[6]      a task id to move only that task ('' for any)

  Output:
    the number of tasks moved

  A requeued task starts afresh: its deadline is cleared, since it has passed for an expired one.
]]
local limit = tonumber(ARGV[4])
local picked = {}
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for _, item in ipairs(items) do
  if #picked >= limit then break end
  local entry = string.sub(item, string.find(item, '\n', 1, true) + 1)
  if ARGV[6] == '' or task_id(entry) == ARGV[6] then
    picked[#picked + 1] = { item, entry }
  end
end
for _, pair in ipairs(picked) do redis.call('LREM', KEYS[1], 1, pair[1]) end
local function fresh(entry)
  local p1 = string.find(entry, '|', 34, true)
  local p2 = string.find(entry, '|', p1 + 1, true)
  return string.sub(entry, 1, p1) .. '0' .. string.sub(entry, p2)
end
if ARGV[5] == 'front' then
  for i = #picked, 1, -1 do redis.call('LPUSH', KEYS[2], fresh(picked[i][2])) end
else
  for i = 1, #picked do redis.call('RPUSH', KEYS[2], fresh(picked[i][2])) end
end
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], ARGV[1]) end
if #picked > 0 and redis.call('ZADD', KEYS[3], 'NX', now_ms(), ARGV[1]) == 1 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return #picked
