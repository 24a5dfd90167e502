--[[
  Helpers prepended to the scripts by pyfiq/backend/scripts.py (Redis scripts cannot include
  files), after the constants ID_LENGTH and TIME_DIGITS that pyfiq/task.py defines. A script
  gets the top-level definitions it uses (directly or through another one), each of which
  starts with a line "local function name(" or "local NAME =": Redis runs a script's whole
  chunk on every call, so a helper it never calls would still cost a closure per call.

  Redis does not roll a script back when it fails half-way, so nothing here may raise once a
  script has started writing: entries are validated by pure string checks that accept any
  input, and every move is one command.
]]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- "<ID_LENGTH lowercase hex id>|<enqueued ms>|<expires ms or 0>|<payload>", exactly as
-- pyfiq.task.Entry.parse accepts it. Returns its expires ms, or nil for anything else. Every
-- task handed out is checked, so the pattern captures positions, not strings: nothing is
-- built for an entry that never expires.
local function entry_expires(entry)
  if type(entry) ~= 'string' then return nil end
  local bar, enq, exp, stop = string.match(entry, '^[0-9a-f]+()|%d+()|()%d+()|')
  if bar ~= ID_LENGTH + 1 or enq - bar - 1 > TIME_DIGITS or stop - exp > TIME_DIGITS then return nil end
  if stop - exp == 1 and string.byte(entry, exp) == 48 then return 0 end
  return tonumber(string.sub(entry, exp, stop - 1))
end

-- entry_expires's check; returns id, expires ms, or nil.
local function parse_entry(entry)
  local expires = entry_expires(entry)
  if not expires then return nil end
  return string.sub(entry, 1, ID_LENGTH), expires
end

-- Tell idle workers that `shard` has work. A channel carrying a hash tag ('{') is a shard's own
-- channel on Redis Cluster: SPUBLISH keeps the message on the node that owns the shard's slot
-- instead of broadcasting it to every node, as PUBLISH would.
local function wake(channel, shard)
  if string.find(channel, '{', 1, true) then
    redis.call('SPUBLISH', channel, shard)
  else
    redis.call('PUBLISH', channel, shard)
  end
end

-- A task entry enqueued now: "<id>|<enqueued ms>|<expires ms or 0>|<payload>" (see
-- parse_entry), both times Redis's, its deadline `ttl` ms (0: none) after its enqueue.
local function new_entry(id, ttl, payload, now)
  local expires = '0'
  if ttl > 0 then expires = string.format('%.0f', now + ttl) end
  return id .. string.format('|%.0f|', now) .. expires .. '|' .. payload
end

local function task_id(entry)
  return string.sub(entry, 1, ID_LENGTH)
end

local function clear_marks(meta, id)
  redis.call('HDEL', meta, 'd:' .. id, 's:' .. id, 'x:' .. id, 'l:' .. id)
end

-- Fields one HDEL names at most: unpack() stays within Lua's stack limit.
local MARKS_SLICE = 1000

-- The fields of a stream's meta hash that are not per-task marks (see keys.py).
local META_FIELDS = { handed = true, running = true, attempt = true, skipped = true, halted = true }

-- Whether the meta hash holds any per-task mark. One more field is asked for than there are
-- named ones: a reply that short is the whole hash, and a full one includes a mark.
local function has_marks(meta)
  for _, field in ipairs(redis.call('HRANDFIELD', meta, 6)) do
    if not META_FIELDS[field] then return true end
  end
  return false
end

-- clear_marks for the tasks of `entries`, in one HDEL per MARKS_SLICE fields rather than one
-- per task (an acknowledgement of a batch is the hot path). Most batches have no marks at all
-- (tasks taken ahead are not marked): one read finds that, instead of naming 4 fields per task.
local function clear_marks_of(meta, entries, n)
  -- One task (the strict setting) was marked when it was handed out: no read first.
  if n > 1 and not has_marks(meta) then return end
  local fields = {}
  for i = 1, n do
    local id = task_id(entries[i])
    fields[#fields + 1] = 'd:' .. id
    fields[#fields + 1] = 's:' .. id
    fields[#fields + 1] = 'x:' .. id
    fields[#fields + 1] = 'l:' .. id
  end
  for first = 1, #fields, MARKS_SLICE do
    redis.call('HDEL', meta, unpack(fields, first, math.min(first + MARKS_SLICE - 1, #fields)))
  end
end

-- One stream's claimable-at score lives in its queue's ready set; the shard's queue index keeps
-- each queue's earliest score, so a poll reads only the queues it consumes.
-- r: { ready, queues, queue }
local function index_queue(r)
  local first = redis.call('ZRANGE', r.ready, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', r.queues, r.queue)
  else
    redis.call('ZADD', r.queues, first[2], r.queue)
  end
end

-- ZADD with an optional 'NX'/'XX' mode; returns what ZADD returned.
local function ready_set(r, stream, score, mode)
  local added
  if mode then
    added = redis.call('ZADD', r.ready, mode, score, stream)
  else
    added = redis.call('ZADD', r.ready, score, stream)
  end
  -- An NX that added nothing changed nothing (the hot path of a busy stream's enqueues).
  if added == 1 or mode ~= 'NX' then index_queue(r) end
  return added
end

local function ready_remove(r, stream)
  redis.call('ZREM', r.ready, stream)
  index_queue(r)
end

local function queue_of(stream)
  local cut = string.find(stream, '#', 1, true)
  if cut then return string.sub(stream, 1, cut - 1) end
  return stream
end

-- Delayed tasks wait in their stream's later set, scored by due time (Redis ms), as
-- "<seq>|<entry>": the seq (SEQ_DIGITS digits, from the stream's counter) sorts tasks due in the
-- same ms in enqueue order. A task joins its stream at its due time: whatever adds work to a
-- stream's pending tail moves the due ones first (promote), so it lands behind them, and a
-- stream with nothing else to do is scored at its first due time, so a poll claims it then.
local SEQ_DIGITS = 16
-- Due tasks one call moves at most: a script's run stays bounded however many fall due at once.
local PROMOTE_SLICE = 500

local function later_member(s, entry)
  return string.format('%016.0f', redis.call('INCR', s.later_seq)) .. '|' .. entry
end

-- The first delayed task's due time, or nil.
local function first_due(later)
  local first = redis.call('ZRANGE', later, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  return tonumber(first[2])
end

-- Move delayed tasks due by `now` to the pending tail, in order, at most PROMOTE_SLICE.
-- Returns whether the stream has delayed tasks at all (before the move), and whether due ones
-- are still left (the slice was full). One ZRANGE when there are none: the hot path.
-- s: { pending, later, later_seq }
local function promote(s, now)
  local due_at = first_due(s.later)
  if not due_at then return false, false end
  if due_at > now then return true, false end
  local due = redis.call('ZRANGEBYSCORE', s.later, '-inf', now, 'LIMIT', 0, PROMOTE_SLICE)
  local entries = {}
  for i, member in ipairs(due) do entries[i] = string.sub(member, SEQ_DIGITS + 2) end
  redis.call('RPUSH', s.pending, unpack(entries))
  -- The first #due by rank are exactly these (ZRANGEBYSCORE from -inf reads in rank order).
  redis.call('ZREMRANGEBYRANK', s.later, 0, #due - 1)
  due_at = first_due(s.later)
  if not due_at then
    redis.call('DEL', s.later_seq)
    return true, false
  end
  return true, due_at <= now
end

-- Work was added to the stream's pending list: make it claimable now, waking idle workers if it
-- was not. A held stream is scored at its lease expiry and left so (its holder takes the work).
-- `waiting`: the stream has delayed tasks, so unheld it may be scored at a due time still ahead.
-- s: { ready, queues, stream, lease, channel, shard }
local function arrived(s, now, waiting)
  local r = { ready = s.ready, queues = s.queues, queue = queue_of(s.stream) }
  local changed
  if waiting and redis.call('EXISTS', s.lease) == 0 then
    changed = redis.call('ZADD', s.ready, 'LT', 'CH', now, s.stream)
    if changed == 1 then index_queue(r) end
  else
    changed = ready_set(r, s.stream, now, 'NX')
  end
  if changed == 1 then wake(s.channel, s.shard) end
end

-- Add a delayed task due at `due`; an unheld stream is claimable from then on (its holder, if it
-- has one, promotes it in a take). Idle workers are woken when the stream's score moved earlier,
-- so the shard's poller hears of the new earliest due time and sleeps until then.
-- s: as arrived(), plus later, later_seq
local function postpone(s, entry, due)
  redis.call('ZADD', s.later, due, later_member(s, entry))
  if redis.call('EXISTS', s.lease) == 1 then return end
  if redis.call('ZADD', s.ready, 'LT', 'CH', due, s.stream) == 1 then
    index_queue({ ready = s.ready, queues = s.queues, queue = queue_of(s.stream) })
    wake(s.channel, s.shard)
  end
end

-- Entries a single RPUSH carries at most: unpack() stays within Lua's stack limit.
local PUSH_SLICE = 1000

-- Append entries enqueued now to the stream: behind its delayed tasks due by now (moved first),
-- or, when more are due than one call moves, into the later set behind those, in order.
-- s: as postpone()
local function push(s, entries, now)
  if #entries == 0 then return end
  local waiting, more = promote(s, now)
  if more then
    for _, entry in ipairs(entries) do redis.call('ZADD', s.later, now, later_member(s, entry)) end
  else
    for first = 1, #entries, PUSH_SLICE do
      redis.call('RPUSH', s.pending, unpack(entries, first, math.min(first + PUSH_SLICE - 1, #entries)))
    end
  end
  arrived(s, now, waiting)
end

-- The stream has nothing pending or in flight: forget it, or, with delayed tasks, score it at
-- the first one's due time, which is returned (the caller's worker looks again then: a score
-- that moved earlier is news to the shard's poller, which last saw the lease's expiry).
local function rest(r, stream, later)
  local due_at = first_due(later)
  if due_at then
    ready_set(r, stream, due_at)
  else
    ready_remove(r, stream)
  end
  return due_at
end

-- An operator paused the stream, or its whole queue (the queue is in every shard's set).
local function is_paused(paused, stream)
  local found = redis.call('SMISMEMBER', paused, stream, queue_of(stream))
  return found[1] == 1 or found[2] == 1
end

-- Give a stream's lease up: forget the holder's hand-over count, and make the stream claimable
-- again in `delay` ms (waking idle workers when that is now) if it holds work, else rest it.
-- s: { lease, pending, inflight, later, meta, ready, queues, stream, channel, shard }
local function give_up_lease(s, delay)
  redis.call('DEL', s.lease)
  if redis.call('LLEN', s.inflight) == 0 then
    redis.call('DEL', s.meta)
  else
    redis.call('HSET', s.meta, 'handed', 0)
    redis.call('HDEL', s.meta, 'halted', 'skipped', 'running', 'attempt')
  end
  local r = { ready = s.ready, queues = s.queues, queue = queue_of(s.stream) }
  if redis.call('LLEN', s.pending) + redis.call('LLEN', s.inflight) > 0 then
    ready_set(r, s.stream, now_ms() + delay)
    if delay == 0 then wake(s.channel, s.shard) end
  elseif rest(r, s.stream, s.later) then
    -- Scored at its first delayed task's due time, earlier than the lease's expiry the shard's
    -- poller last saw: the wake-up makes it look again, and wake for that task.
    wake(s.channel, s.shard)
  end
end

-- Refuse to mix shard layouts: a producer or worker with another shard count would put or look
-- for a stream's keys in another shard. The layout is written again whenever it is missing
-- (an empty restart), so the guard survives. Returns an error reply or nil.
-- `unlaid_refused`: a missing layout is refused rather than written. A producer with more
-- shards than the fleet would otherwise lay out, and fill, a shard no worker polls; its client
-- checks the layout of every shard of its count first (see Transport.lay_out), then writes this.
-- A layout "<count>?" is a producer's tentative one (see settle.lua): for the enqueue, as if
-- missing; a poll of the same count makes it final.
local function check_layout(key, shards, unlaid_refused)
  local stored = redis.call('GET', key)
  if stored == shards then return nil end
  if not stored or stored == shards .. '?' then
    if unlaid_refused then
      return redis.error_reply('PYFIQUNLAID shard layout key ' .. key .. ' is missing')
    end
    redis.call('SET', key, shards)
  else
    return redis.error_reply('PYFIQLAYOUT this prefix is laid out with ' .. stored ..
      ' shards, the caller uses ' .. shards)
  end
  return nil
end

-- Count tasks of a queue that finished ('s' succeeded: acknowledged; 'f' failed: dead-lettered)
-- per minute of Redis time, so a dashboard shows the fleet's rate: a ring of COUNT_MINUTES slots
-- in one hash per queue and shard ('m<slot>' the minute the slot holds, then its two counts), so
-- the hash stays small however long it runs. It expires COUNT_MINUTES after the last new minute
-- began, so a queue that stops leaves nothing behind. `counts` may be nil (nothing counted);
-- `now` (Redis ms) saves a TIME call where the caller has it.
local function tally(counts, kind, n, now)
  if not counts or n <= 0 then return end
  local minute = math.floor((now or now_ms()) / 60000)
  local slot = minute % COUNT_MINUTES
  local stamp = string.format('%d', minute)
  if redis.call('HGET', counts, 'm' .. slot) ~= stamp then
    redis.call('HSET', counts, 'm' .. slot, stamp, 's' .. slot, 0, 'f' .. slot, 0)
    redis.call('PEXPIRE', counts, (COUNT_MINUTES + 1) * 60000)
  end
  redis.call('HINCRBY', counts, kind .. slot, n)
end

-- Append one dead letter: "<header>\n<entry>" scored by a sequence number, so records stay in
-- the order they died, can be paged in bounded steps and found by task id in O(log n).
-- d: { dead, dead_ids, dlq_index, stream, counts (optional), results (optional) }; header is
-- a JSON object; id may be nil. A task's result() waiter hears of it on the task's channel.
local function dead_add(d, header, entry, id)
  local last = redis.call('ZRANGE', d.dead, -1, -1, 'WITHSCORES')
  local seq = 1
  if #last > 0 then seq = tonumber(last[2]) + 1 end
  local record = '{"seq":' .. string.format('%d', seq) .. ',' .. string.sub(header, 2) .. '\n' .. entry
  redis.call('ZADD', d.dead, seq, record)
  if id then redis.call('HSET', d.dead_ids, id, seq) end
  redis.call('SADD', d.dlq_index, d.stream)
  tally(d.counts, 'f', 1)
  if id and d.results then redis.call('SPUBLISH', d.results .. id, 'd') end
end

-- Store the results that came with acknowledgements (only tasks of a store_result function send
-- one): ARGV[from] says how many, then each is a task id, a TTL in ms and the encoded value. Each
-- is kept under results .. id and announced on the sharded channel of that name, where a
-- waiting result() listens. `acked`: the ids this call acknowledged, when it may have left some
-- out (a tolerant release): only their results count. A task acknowledged earlier keeps the
-- result stored then; one an operator's skip dead-lettered has none, whatever its run returned.
local function store_results(results, from, acked)
  local n = tonumber(ARGV[from] or '0')
  for i = 0, n - 1 do
    local at = from + 1 + 3 * i
    if acked == nil or acked[ARGV[at]] then
      local key = results .. ARGV[at]
      redis.call('SET', key, ARGV[at + 2], 'PX', ARGV[at + 1])
      redis.call('SPUBLISH', key, 's')
    end
  end
end

local function simple_header(reason, deliveries, now, extra)
  return string.format('{"reason":"%s","deliveries":%d,"at_ms":%.0f%s}', reason, deliveries, now, extra or '')
end

-- Remove the first #ids entries of the in-flight list, which must be exactly these tasks in
-- this order. Checked before anything is written. With `tolerant`, ids no longer in flight
-- count as already acknowledged (a retried call after a lost reply, or a task an operator's
-- skip dead-lettered meanwhile); returns how many entries were removed, or false when the list
-- does not match, and the set of the ids removed.
local function ack_head(inflight, meta, ids, tolerant)
  local removed = {}
  if #ids == 0 then return 0, removed end
  local heads = redis.call('LRANGE', inflight, 0, #ids - 1)
  local n = 0
  for _, id in ipairs(ids) do
    if heads[n + 1] ~= nil and task_id(heads[n + 1]) == id then
      n = n + 1
      removed[id] = true
    elseif not tolerant then
      return false
    end
  end
  if n > 0 then
    redis.call('LTRIM', inflight, n, -1)
    clear_marks_of(meta, heads, n)
  end
  return n, removed
end

local function handed_after(meta, nack)
  local handed = tonumber(redis.call('HGET', meta, 'handed') or '0') - nack
  if handed < 0 then handed = 0 end
  return handed
end

local function argv_slice(from, count)
  local out = {}
  for i = 1, count do out[i] = ARGV[from + i - 1] end
  return out
end

-- Hand up to `want` tasks to the lease holder, appending "entry, deliveries" pairs to `out`.
--
-- In-flight entries an earlier holder left behind come first, one at a time. Each is counted
-- as a delivery; it counts as a lost consumer ('x:') only if that holder had started it ('s:'),
-- so tasks a holder took but never ran are never charged. A task whose consumers were lost
-- `maxd` times is dead-lettered: as 'lease-lost' when a holder reported that the task outlived
-- its lease ('l:', the holder was alive), otherwise as 'poison' (its consumers died).
-- Then fresh tasks from pending; those past their deadline are dead-lettered as expired.
-- Anything that is not a well-formed entry is dead-lettered as undecodable, raw bytes kept.
--
-- The first task handed is marked started ('s:', with the hand-out's Redis ms, so operators see
-- how long it has run): the holder runs it as soon as the reply arrives (a rate-limited holder
-- asks its permit before taking). Returns the new 'handed'.
-- `ahead`: the holder takes while it still runs earlier tasks (group commit), so it starts
-- none of these at once: none is marked, and a task an earlier holder left in flight is not
-- handed at all (it comes back one at a time, marked, once the holder has run out of tasks).
-- s: { pending, inflight, meta, dead, dead_ids, dlq_index, stream, counts, results }
local function hand_out(s, handed, want, maxd, now, out, ahead)
  local base = #out
  if ahead and redis.call('LINDEX', s.inflight, handed) then return handed end
  while #out == base do
    local entry = redis.call('LINDEX', s.inflight, handed)
    if not entry then break end
    local id = parse_entry(entry)
    if not id then
      -- Earlier entries are the holder's own, valid ones, so this removes exactly this one.
      redis.call('LREM', s.inflight, 1, entry)
      dead_add(s, simple_header('undecodable', 0, now, ',"error":"malformed task entry in flight"'), entry, nil)
    else
      local lost = tonumber(redis.call('HGET', s.meta, 'x:' .. id) or '0')
      if redis.call('HEXISTS', s.meta, 's:' .. id) == 1 then lost = lost + 1 end
      local deliveries = tonumber(redis.call('HGET', s.meta, 'd:' .. id) or '1') + 1
      if lost >= maxd then
        local outlived = tonumber(redis.call('HGET', s.meta, 'l:' .. id) or '0')
        redis.call('LREM', s.inflight, 1, entry)
        clear_marks(s.meta, id)
        local reason, extra = 'poison', ',"lost":' .. lost
        if outlived > 0 then
          reason = 'lease-lost'
          extra = extra .. ',"outlived":' .. outlived .. ',"error":"the task ran past its lease ' .. outlived ..
            ' time(s) while its worker was alive (it held the GIL, blocked the event loop or the process' ..
            ' was paused longer than lease_ttl): raise lease_ttl or let the heartbeat run"'
        end
        dead_add(s, simple_header(reason, deliveries - 1, now, extra), entry, id)
      else
        redis.call('HSET', s.meta, 'd:' .. id, deliveries, 's:' .. id, now)
        if lost > 0 then redis.call('HSET', s.meta, 'x:' .. id, lost) end
        handed = handed + 1
        out[#out + 1] = entry
        out[#out + 1] = deliveries
      end
    end
  end
  if #out > base then return handed end
  -- Fresh tasks move a slice at a time (one read, one trim, one append): a per-task move would
  -- make the per-call overhead of a Redis command the largest cost of a batch.
  while #out < base + 2 * want do
    local need = want - (#out - base) / 2
    local slice
    if need == 1 then
      -- One task (the strict setting): one command, not three.
      slice = { redis.call('LMOVE', s.pending, s.inflight, 'LEFT', 'RIGHT') }
      if not slice[1] then break end
    else
      slice = redis.call('LRANGE', s.pending, 0, need - 1)
      if #slice == 0 then break end
      redis.call('LTRIM', s.pending, #slice, -1)
    end
    local moved = {}
    for _, entry in ipairs(slice) do
      local expires = entry_expires(entry)
      if not expires or (expires > 0 and expires <= now) then
        if need == 1 then redis.call('RPOP', s.inflight) end
        if not expires then
          dead_add(s, simple_header('undecodable', 0, now, ',"error":"malformed task entry"'), entry, nil)
        else
          dead_add(s, simple_header('expired', 0, now), entry, task_id(entry))
        end
      else
        if #out == base and not ahead then redis.call('HSET', s.meta, 's:' .. task_id(entry), now) end
        moved[#moved + 1] = entry
        out[#out + 1] = entry
        out[#out + 1] = 1
      end
    end
    if need == 1 then
      handed = handed + #moved
    elseif #moved > 0 then
      for first = 1, #moved, PUSH_SLICE do
        redis.call('RPUSH', s.inflight, unpack(moved, first, math.min(first + PUSH_SLICE - 1, #moved)))
      end
      handed = handed + #moved
    end
  end
  return handed
end

-- An operator's removal of one pending task (delete_pending, dead_letter_pending): the entries
-- around the place the operator saw the task at are looked through first. A task moves from
-- that place only by what holders took from the head, or put back ahead of it, since the page
-- was read, so a window FIND_SLACK entries wide on either side nearly always holds it.
local FIND_SLACK = 500

-- Take task `id` out of the pending list: looked for in the window around `hint` (-1: none),
-- then from the head, at most `limit` entries, a slice at a time. Only a well-formed entry
-- matches: a malformed one is the hand-out's to dead-letter, with its bytes. Returns the entry
-- removed, or nil and whether the whole list was looked through.
local function take_pending(pending, id, hint, limit)
  local total = redis.call('LLEN', pending)
  local found, at = nil, nil
  if hint >= 0 and hint < total + FIND_SLACK then
    local from = math.max(0, hint - FIND_SLACK)
    for i, entry in ipairs(redis.call('LRANGE', pending, from, hint + FIND_SLACK)) do
      if task_id(entry) == id and parse_entry(entry) then found, at = entry, from + i - 1 break end
    end
  end
  local from = 0
  while not found and from < total and from < limit do
    local upto = math.min(from + 500, limit, total) - 1
    for i, entry in ipairs(redis.call('LRANGE', pending, from, upto)) do
      if task_id(entry) == id and parse_entry(entry) then found, at = entry, from + i - 1 break end
    end
    from = upto + 1
  end
  if not found then return nil, total <= limit end
  -- LREM compares entries from the end it starts at: from the nearer one, the entry (unique:
  -- its id is) costs O(its distance to that end) to reach, not O(its place).
  redis.call('LREM', pending, at < total / 2 and 1 or -1, found)
  return found
end

-- Where task `id` is in the in-flight list, as a refusal to remove it: { 2, 0-based place,
-- how many leading entries the holder was handed, the lease value or '', the task the holder
-- said it runs or '', the Redis ms it was handed out started or '' }, or nil when it is not in
-- flight. The list holds what holders took
-- (bounded by their prefetch), so it is read whole, as status.lua does.
local function in_flight(s, id)
  for i, entry in ipairs(redis.call('LRANGE', s.inflight, 0, -1)) do
    if task_id(entry) == id then
      local marks = redis.call('HMGET', s.meta, 'handed', 'running', 's:' .. id)
      return { 2, i - 1, tonumber(marks[1] or '0'), redis.call('GET', s.lease) or '', marks[2] or '', marks[3] or '' }
    end
  end
  return nil
end

-- A pending task was taken out by an operator: its marks go, and a stream left with nothing
-- pending or in flight that nobody holds is forgotten (or scored at its first delayed task),
-- as a claim of it would do. A held one is its holder's to let go: its next take finds it
-- empty. s: { lease, pending, inflight, meta, ready, queues, later, stream }
local function taken_out(s, id)
  clear_marks(s.meta, id)
  if redis.call('EXISTS', s.lease) == 1 then return end
  if redis.call('LLEN', s.pending) + redis.call('LLEN', s.inflight) > 0 then return end
  redis.call('DEL', s.meta)
  rest({ ready = s.ready, queues = s.queues, queue = queue_of(s.stream) }, s.stream, s.later)
end
