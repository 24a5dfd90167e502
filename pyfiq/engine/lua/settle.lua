--[[
  Settle a shard layout a producer wrote as tentative ("<count>?"): made final once the producer
  read shard 0's layout as its own count, or taken back when it found another's. A tentative
  layout lets no task in (the enqueue script answers as for a missing one), so a producer of the
  same count that checked the prefix before cannot store tasks in a shard the fleet may lack
  while the producer that wrote it is still finding out.

  Input:
    KEYS[1]      layout key of the shard
    ARGV[1]      the tentative layout the caller wrote
    ARGV[2]      what it becomes: the final layout, or '' to delete it

  Output:
    1 if the key held the caller's tentative layout and is settled, else 0 (gone, or another's).
]]
local layout = KEYS[1]
if redis.call('GET', layout) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', layout)
else
  redis.call('SET', layout, ARGV[2])
end
return 1
