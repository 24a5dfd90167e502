--[[
  Move one pending task of a stream to its dead letters, found by its id (an operator's
  action), with the header the operator's call wrote (reason 'operator'). As delete_pending.lua:
  a task a holder was handed (running, taken ahead, or left in flight for the next holder) is
  refused with nothing changed; the tasks behind it keep their order; an emptied stream nobody
  holds is forgotten. The dead letter can be requeued like any other.

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      pending list
    KEYS[3]      in-flight list
    KEYS[4]      meta hash
    KEYS[5]      ready set of the stream's queue in this shard
    KEYS[6]      queue index of the shard
    KEYS[7]      dead letters of the stream
    KEYS[8]      dead letter ids of the stream
    KEYS[9]      dead-letter index set of the shard
    KEYS[10]     per-minute counts of finished tasks of the stream's queue in this shard
    KEYS[11]     prefix of the stream's stored results (a result() waiter hears of it)
    KEYS[12]     delayed tasks of the stream (those due join it first, as a claim moves them)
    KEYS[13]     the counter ordering delayed tasks
    ARGV[1]      stream name
    ARGV[2]      task id
    ARGV[3]      the place in the pending list the operator saw it at (-1: unknown)
    ARGV[4]      how many pending entries to look through from the head at most
    ARGV[5]      dead-letter record header (a JSON object on one line)

  Output:
    { 1, entry }      dead-lettered
    { 2, place, handed, lease or '', running or '', started or '' }
                      in flight (see in_flight in lib.lua): refused, nothing changed
    { 0, complete }   not pending: complete = 1 when the whole pending list was looked through
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
local counts = KEYS[10]
local results = KEYS[11]
local later = KEYS[12]
local later_seq = KEYS[13]
local id = ARGV[2]
if string.sub(ARGV[5], 1, 1) ~= '{' then
  return redis.error_reply('ERR pyfiq: the dead-letter header is not a JSON object')
end
local s = { lease = lease, pending = pending, inflight = inflight, meta = meta, ready = ready, queues = queues,
            later = later, stream = ARGV[1] }
local refused = in_flight(s, id)
if refused then return refused end
promote({ pending = pending, later = later, later_seq = later_seq }, now_ms())
local entry, complete = take_pending(pending, id, tonumber(ARGV[3]), tonumber(ARGV[4]))
if not entry then return { 0, complete and 1 or 0 } end
taken_out(s, id)
dead_add({ dead = dead, dead_ids = dead_ids, dlq_index = dlq_index, stream = ARGV[1], counts = counts, results = results },
         ARGV[5], entry, id)
return { 1, entry }
