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
