--[[
  Extend a lease the caller still holds (heartbeat), and tell the holder whether an operator
  has halted its stream since (see "Operator actions and work taken ahead" in the README).

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      ready set of the stream's queue in this shard
    KEYS[3]      queue index of the shard
    KEYS[4]      paused queues and streams of the shard
    KEYS[5]      meta hash of the stream
    ARGV[1]      lease token
    ARGV[2]      lease TTL in ms
    ARGV[3]      stream name
    ARGV[4]      id of the task the holder runs now ('' for none): what a skip dead-letters
    ARGV[5]      optional, for a task being retried: "<attempt>:<Redis ms of the next attempt,
                 0 while one runs>", what a status read reports

  Output:
    1 renewed
    2 renewed, but the stream or its queue is paused: start nothing more
    { 3, skipped task ids } an operator's skip revoked the lease (its value is now '!' .. token):
          the revocation is renewed instead, so nobody else claims the stream while this live
          holder may still run tasks it took ahead; it lets go with a release under '!' .. token
    0 the lease is gone or held by someone else (the caller is fenced)
]]
local lease = KEYS[1]
local ready = KEYS[2]
local queues = KEYS[3]
local paused = KEYS[4]
local meta = KEYS[5]
local held = redis.call('GET', lease)
local code = 1
if held ~= ARGV[1] then
  if held ~= '!' .. ARGV[1] then return 0 end
  code = 3
end
local now = now_ms()
redis.call('PEXPIRE', lease, ARGV[2])
if ARGV[4] ~= '' then
  redis.call('HSET', meta, 'running', ARGV[4])
else
  redis.call('HDEL', meta, 'running')
end
if ARGV[5] and ARGV[4] ~= '' then
  redis.call('HSET', meta, 'attempt', ARGV[5])
else
  redis.call('HDEL', meta, 'attempt')
end
ready_set({ ready = ready, queues = queues, queue = queue_of(ARGV[3]) }, ARGV[3], now + tonumber(ARGV[2]), 'XX')
if code == 3 then return { 3, redis.call('HGET', meta, 'skipped') or '' } end
if is_paused(paused, ARGV[3]) then return 2 end
return 1
