--[[
  A holder confirms that it starts nothing more under its lease (it learnt that an operator
  paused its stream): what ``pause()`` waits for before it returns.

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      meta hash of the stream
    ARGV[1]      lease token

  Output:
    1 when recorded, 0 if the lease is gone (then there is nothing to wait for either)
]]
local lease = KEYS[1]
local meta = KEYS[2]
if redis.call('GET', lease) ~= ARGV[1] then return 0 end
redis.call('HSET', meta, 'halted', ARGV[1])
return 1
