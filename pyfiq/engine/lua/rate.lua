--[[
  Fleet-wide rate limit of one queue (GCRA: a theoretical arrival time advanced per start).

  Input:
    KEYS[1]      rate key of the queue
    ARGV[1]      emission interval in ms (1000 / tasks per second)
    ARGV[2]      burst: how many starts may follow each other without spacing (>= 1)

  Output:
    0 when a task may start now (the start is counted), else ms to wait before asking again

  Waiting keeps order: the stream's holder simply pauses before its head task.
]]
local rate = KEYS[1]
local now = now_ms()
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', rate) or '0')
if tat < now then tat = now end
if now < tat - tolerance then return math.ceil(tat - tolerance - now) end
local nxt = tat + interval
redis.call('SET', rate, string.format('%.3f', nxt), 'PX', math.ceil(nxt - now + 1000))
return 0
