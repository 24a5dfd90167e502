--[[
  Delete one pending task of a stream, found by its id (an operator's action). Only a task
  still in the pending list goes: one a holder was handed (running, taken ahead, or left in
  flight for the next holder) is refused with nothing changed, so no task is taken from under
  a worker that may run it. The tasks behind it keep their order. A stream emptied by it that
  nobody holds is forgotten, as a claim of it would do.

  Input:
    KEYS[1]      lease key of the stream
    KEYS[2]      pending list
    KEYS[3]      in-flight list
    KEYS[4]      meta hash
    KEYS[5]      ready set of the stream's queue in this shard
    KEYS[6]      queue index of the shard
    KEYS[7]      prefix of the stream's stored results (a result() waiter hears of the delete)
    KEYS[8]      delayed tasks of the stream (those due join it first, as a claim moves them)
    KEYS[9]      the counter ordering delayed tasks
    ARGV[1]      stream name
    ARGV[2]      task id
    ARGV[3]      the place in the pending list the operator saw it at (-1: unknown)
    ARGV[4]      how many pending entries to look through from the head at most

  Output:
    { 1, entry }      deleted
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
local results = KEYS[7]
local later = KEYS[8]
local later_seq = KEYS[9]
local id = ARGV[2]
local s = { lease = lease, pending = pending, inflight = inflight, meta = meta, ready = ready, queues = queues,
            later = later, stream = ARGV[1] }
local refused = in_flight(s, id)
if refused then return refused end
promote({ pending = pending, later = later, later_seq = later_seq }, now_ms())
local entry, complete = take_pending(pending, id, tonumber(ARGV[3]), tonumber(ARGV[4]))
if not entry then return { 0, complete and 1 or 0 } end
taken_out(s, id)
-- A status read finds the task nowhere, at any depth of the stream, and says it was deleted;
-- a result() waiter reads it again now and its wait ends.
redis.call('SET', results .. id .. '#deleted', '1', 'PX', 86400000)
redis.call('SPUBLISH', results .. id, 'x')
return { 1, entry }
