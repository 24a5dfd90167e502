--[[
  Acknowledge finished tasks and give the lease up at once (graceful stop, a fair yield, a
  stream parked until its rate permit, or the hand-over after an I/O error).

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      pending list
    KEYS[3]      in-flight list
    KEYS[4]      meta hash
    KEYS[5]      ready set of the stream's queue in this shard
    KEYS[6]      queue index of the shard
    KEYS[7]      per-minute counts of finished tasks of the stream's queue in this shard
    KEYS[8]      prefix of the stream's stored results (see take.lua)
    KEYS[9]      delayed tasks of the stream (see enqueue.lua)
    ARGV[1]      lease token
    ARGV[2]      stream name
    ARGV[3]      number of acknowledged task ids k
    ARGV[4]      number of started task ids m
    ARGV[5]      wake-up channel
    ARGV[6]      shard number
    ARGV[7]      ms before the stream may be claimed again (0: at once)
    ARGV[8..]    k acknowledged task ids, oldest first, then m ids of tasks the holder started
                 and did not finish (they may have run), then optionally a count r and r
                 results to store (task id, TTL ms, value)

  Output:
    -1 if the caller's lease is gone (nothing changed), 1 when released

  The holder is alive, so no task it leaves behind killed its consumer: their 'started' marks
  are cleared. Tasks it was handed but never started get their delivery back, and those at the
  tail of the in-flight list that were never delivered before go back to the head of pending,
  in order, as fresh tasks. Acknowledgements are applied tolerantly: after a lost reply the
  holder cannot know whether its last call acknowledged them.
]]
local lease = KEYS[1]
local pending = KEYS[2]
local inflight = KEYS[3]
local meta = KEYS[4]
local ready = KEYS[5]
local queues = KEYS[6]
local counts = KEYS[7]
local results = KEYS[8]
local later = KEYS[9]
if redis.call('GET', lease) ~= ARGV[1] then return -1 end
local nack = tonumber(ARGV[3])
local applied, acked = ack_head(inflight, meta, argv_slice(8, nack), true)
tally(counts, 's', applied)
store_results(results, 8 + nack + tonumber(ARGV[4]), acked)
local handed = handed_after(meta, applied)
local started = {}
for _, id in ipairs(argv_slice(8 + nack, tonumber(ARGV[4]))) do started[id] = true end
local total = redis.call('LLEN', inflight)
if handed > total then handed = total end
local mine = {}
if handed > 0 then mine = redis.call('LRANGE', inflight, 0, handed - 1) end
local moved = 0
if handed == total then
  for i = #mine, 1, -1 do
    local id = task_id(mine[i])
    if started[id] or redis.call('HEXISTS', meta, 'd:' .. id) == 1 then break end
    redis.call('RPOP', inflight)
    redis.call('LPUSH', pending, mine[i])
    clear_marks(meta, id)
    moved = moved + 1
  end
end
for i = 1, #mine - moved do
  local id = task_id(mine[i])
  redis.call('HDEL', meta, 's:' .. id)
  if not started[id] then
    -- Never started here: the next holder's hand-over adds this delivery back.
    local d = tonumber(redis.call('HGET', meta, 'd:' .. id) or '1') - 1
    if d < 0 then d = 0 end
    redis.call('HSET', meta, 'd:' .. id, d)
  end
end
give_up_lease({ lease = lease, pending = pending, inflight = inflight, later = later, meta = meta, ready = ready,
                queues = queues, stream = ARGV[2], channel = ARGV[5], shard = ARGV[6] }, tonumber(ARGV[7]))
return 1
