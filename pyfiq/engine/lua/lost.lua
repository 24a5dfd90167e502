--[[
  Report that a task ran past its lease while its worker was alive (the worker's heartbeat
  could not run: a task holding the GIL, a blocked event loop, a paused process). Unfenced on
  purpose: the reporter no longer holds the lease, and the note changes no queue state; it
  only tells the hand-out why this task's consumers keep being lost (reason 'lease-lost'
  instead of 'poison').

  Input:
    KEYS[1]      in-flight list of the stream
    KEYS[2]      meta hash
    ARGV[1]      the task's entry, exactly as handed out
    ARGV[2]      how many leading in-flight entries to look at at most

  Output:
    1 if noted, 0 if the task is no longer in flight
]]
local inflight = KEYS[1]
local meta = KEYS[2]
local pos = redis.call('LPOS', inflight, ARGV[1], 'MAXLEN', tonumber(ARGV[2]))
if not pos then return 0 end
redis.call('HINCRBY', meta, 'l:' .. task_id(ARGV[1]), 1)
return 1
