--[[
  Helpers prepended to every script by pyfiq/scripts.py (Redis scripts cannot include files).
]]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function task_id(entry)
  return string.sub(entry, 1, 32)
end

-- Remove the first #ids entries of the in-flight list, which must be exactly these tasks in
-- this order. Checked before anything is written: Redis does not roll a script back on error.
local function ack_head(inflight, meta, ids)
  if #ids == 0 then return true end
  local heads = redis.call('LRANGE', inflight, 0, #ids - 1)
  for i, id in ipairs(ids) do
    if heads[i] == nil or task_id(heads[i]) ~= id then return false end
  end
  redis.call('LTRIM', inflight, #ids, -1)
  local fields = {}
  for i, id in ipairs(ids) do fields[i] = 'd:' .. id end
  redis.call('HDEL', meta, unpack(fields))
  return true
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
-- In-flight entries an earlier holder left behind come first, one at a time, each with its
-- delivery count raised: a task that kills its consumer is the only one whose count rises,
-- and past `maxd` it is dead-lettered as poison. Then fresh tasks from pending; those past
-- their deadline are dead-lettered as expired instead. Returns the new 'handed' count.
-- s: { pending, inflight, meta, dlq, dlq_index, stream }
local function hand_out(s, handed, want, maxd, out)
  local base = #out
  local now = nil
  while #out == base do
    local entry = redis.call('LINDEX', s.inflight, handed)
    if not entry then break end
    local id = task_id(entry)
    local deliveries = tonumber(redis.call('HGET', s.meta, 'd:' .. id) or '1') + 1
    if deliveries > maxd then
      now = now or now_ms()
      redis.call('LREM', s.inflight, 1, entry)
      redis.call('HDEL', s.meta, 'd:' .. id)
      redis.call('RPUSH', s.dlq, string.format(
        '{"reason":"poison","deliveries":%d,"at_ms":%.0f}\n', deliveries - 1, now) .. entry)
      redis.call('SADD', s.dlq_index, s.stream)
    else
      redis.call('HSET', s.meta, 'd:' .. id, deliveries)
      handed = handed + 1
      out[#out + 1] = entry
      out[#out + 1] = deliveries
    end
  end
  if #out > base then return handed end
  while #out < base + 2 * want do
    local entry = redis.call('LPOP', s.pending)
    if not entry then break end
    local p1 = string.find(entry, '|', 34, true)
    local p2 = string.find(entry, '|', p1 + 1, true)
    local expires = tonumber(string.sub(entry, p1 + 1, p2 - 1))
    now = now or now_ms()
    if expires > 0 and expires <= now then
      redis.call('RPUSH', s.dlq, string.format(
        '{"reason":"expired","deliveries":0,"at_ms":%.0f}\n', now) .. entry)
      redis.call('SADD', s.dlq_index, s.stream)
    else
      redis.call('RPUSH', s.inflight, entry)
      handed = handed + 1
      out[#out + 1] = entry
      out[#out + 1] = 1
    end
  end
  return handed
end
