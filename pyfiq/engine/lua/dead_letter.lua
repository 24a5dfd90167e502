--[[
  Acknowledge finished tasks, then move the next in-flight task to the dead letters.

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      in-flight list
    KEYS[3]      meta hash
    KEYS[4]      dead letters of the stream
    KEYS[5]      dead letter ids of the stream
    KEYS[6]      dead-letter index set of the shard
    KEYS[7]      per-minute counts of finished tasks of the stream's queue in this shard
    KEYS[8]      prefix of the stream's stored results (see take.lua)
    ARGV[1]      lease token
    ARGV[2]      stream name
    ARGV[3]      number of acknowledged task ids k
    ARGV[4]      id of the task to dead-letter (must follow the k acknowledged ones)
    ARGV[5]      dead-letter record header (a JSON object on one line)
    ARGV[6..]    k task ids, oldest first
    ARGV[6+k..]  optional: a count r, then r results (task id, TTL ms, value) to store

  Output:
    -1 if the caller's lease is gone (nothing changed), 1 when done
]]
local lease = KEYS[1]
local inflight = KEYS[2]
local meta = KEYS[3]
local dead = KEYS[4]
local dead_ids = KEYS[5]
local dlq_index = KEYS[6]
local counts = KEYS[7]
local results = KEYS[8]
if redis.call('GET', lease) ~= ARGV[1] then return -1 end
local nack = tonumber(ARGV[3])
local entry = redis.call('LINDEX', inflight, nack)
if not entry or task_id(entry) ~= ARGV[4] or string.sub(ARGV[5], 1, 1) ~= '{' then
  return redis.error_reply('ERR pyfiq: dead-lettered task is not next in the in-flight list')
end
if not ack_head(inflight, meta, argv_slice(6, nack), false) then
  return redis.error_reply('ERR pyfiq: acknowledged tasks are not at the head of the in-flight list')
end
tally(counts, 's', nack)
store_results(results, 6 + nack)
redis.call('LPOP', inflight)
clear_marks(meta, ARGV[4])
redis.call('HSET', meta, 'handed', handed_after(meta, nack + 1))
dead_add({ dead = dead, dead_ids = dead_ids, dlq_index = dlq_index, stream = ARGV[2], counts = counts, results = results },
         ARGV[5], entry, parse_entry(entry))
return 1
