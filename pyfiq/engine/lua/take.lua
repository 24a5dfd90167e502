--[[
  Acknowledge finished tasks and take the next ones, in one round trip (the hot path).

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      pending list
    KEYS[3]      in-flight list
    KEYS[4]      meta hash ('handed': how many leading in-flight entries the holder has been
                 given; per-task marks, see keys.py)
    KEYS[5]      ready set of the stream's queue in this shard
    KEYS[6]      queue index of the shard
    KEYS[7]      dead letters of the stream
    KEYS[8]      dead letter ids of the stream
    KEYS[9]      dead-letter index set of the shard
    KEYS[10]     paused queues and streams of the shard
    KEYS[11]     per-minute counts of finished tasks of the stream's queue in this shard
    KEYS[12]     prefix of the stream's stored results (result key and channel: prefix .. id)
    KEYS[13]     delayed tasks of the stream (see enqueue.lua)
    KEYS[14]     the counter ordering delayed tasks
    ARGV[1]      lease token
    ARGV[2]      stream name
    ARGV[3]      number of acknowledged task ids k
    ARGV[4]      how many tasks to take at most (0: acknowledge only)
    ARGV[5]      lost consumers after which a task is dead-lettered
    ARGV[6]      '1': taken ahead, while the holder still runs earlier tasks (see hand_out)
    ARGV[7..]    k task ids, oldest first
    ARGV[7+k..]  optional: a count r, then r results (task id, TTL ms, value) to store

  Output:
    { -1 }                       the caller's lease is gone: nothing was changed
    { -2 }                       an operator's skip revoked the lease (see skip.lua): nothing
                                 was changed; the holder starts nothing more and lets go
    { 2 }                        acknowledged, nothing taken (ARGV[4] was 0)
    { 3 }                        acknowledged, nothing taken: the stream or its queue is paused
    { 0 }                        the stream is empty: the lease was released and the stream
                                 forgotten
    { 0, ms }                    the same, but the stream has delayed tasks, the first due in
                                 ms: it is scored then
    { 1, Redis ms, entry, deliveries, ...} the tasks handed over, in order (possibly none)

  Which tasks are handed over, and which are dead-lettered instead, is hand_out() in lib.lua.
]]
local lease = KEYS[1]
local pending = KEYS[2]
local inflight = KEYS[3]
local meta = KEYS[4]
local ready = KEYS[5]
local queues = KEYS[6]
local dead = KEYS[7]
local dead_ids = KEYS[8]
local dlq_index = KEYS[9]
local paused = KEYS[10]
local counts = KEYS[11]
local results = KEYS[12]
local later = KEYS[13]
local later_seq = KEYS[14]
local held = redis.call('GET', lease)
if held ~= ARGV[1] then
  if held == '!' .. ARGV[1] then return { -2 } end
  return { -1 }
end
local nack = tonumber(ARGV[3])
if not ack_head(inflight, meta, argv_slice(7, nack), false) then
  return redis.error_reply('ERR pyfiq: acknowledged tasks are not at the head of the in-flight list')
end
store_results(results, 7 + nack)
local now = now_ms()
tally(counts, 's', nack, now)
local handed = handed_after(meta, nack)
local want = tonumber(ARGV[4])
if want == 0 then
  redis.call('HSET', meta, 'handed', handed)
  return { 2 }
end
if is_paused(paused, ARGV[2]) then
  -- A running task finishes; nothing new starts until an operator resumes the stream.
  redis.call('HSET', meta, 'handed', handed)
  return { 3 }
end
-- Delayed tasks that fell due while the stream was held join it now, behind what it holds.
promote({ pending = pending, later = later, later_seq = later_seq }, now)
local out = { 1, now }
handed = hand_out({ pending = pending, inflight = inflight, meta = meta, dead = dead, dead_ids = dead_ids,
                    dlq_index = dlq_index, stream = ARGV[2], counts = counts, results = results }, handed, want, tonumber(ARGV[5]), now, out, ARGV[6] == '1')
if #out == 2 and redis.call('LLEN', inflight) == 0 then
  -- Nothing left anywhere: forget the stream so idle streams leave no keys behind.
  redis.call('DEL', lease, meta)
  local due_at = rest({ ready = ready, queues = queues, queue = queue_of(ARGV[2]) }, ARGV[2], later)
  if due_at then return { 0, due_at - now } end
  return { 0 }
end
redis.call('HSET', meta, 'handed', handed)
return out
