--[[
  Take back a shard's layout that a producer wrote and then found contradicted (shard 0 laid out
  with another count meanwhile): left in place, it would let a producer of that count, one that
  checked the prefix before, store tasks in a shard the fleet may not have.

  Input:
    KEYS[1]      layout key of the shard
    ARGV[1]      the shard count the caller wrote

  Output:
    1 if the key held the caller's count and is deleted, else 0 (another's, or gone).
]]
local layout = KEYS[1]
if redis.call('GET', layout) == ARGV[1] then
  redis.call('DEL', layout)
  return 1
end
return 0
