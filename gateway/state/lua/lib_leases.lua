-- lib_leases: reservations held by requests in flight, and the money they hold.
--   budget  hash  'reserved' -> sum of the live leases' amounts (nanos)
--   leases  zset  reservation id -> lease expiry (ms); ZCARD = requests in flight
--   lease   hash  reservation id -> 'amount tokens minute'
-- requires lib_windows (int).

local function lease_parse(s)
  local amount, tokens, minute = string.match(s, '^(%S+) (%S+) (%S+)$')
  return tonumber(amount), tonumber(tokens), tonumber(minute)
end

-- Drop every lease that expired at or before now and give its amount back.
-- Batches keep unpack() far below Lua's stack limit after a mass expiry.
local function expire_leases(budget, leases, lease, now)
  while true do
    local gone = redis.call('ZRANGEBYSCORE', leases, '-inf', int(now), 'LIMIT', 0, 500)
    if #gone == 0 then
      return
    end
    local freed = 0
    for _, id in ipairs(gone) do
      local s = redis.call('HGET', lease, id)
      if s then
        freed = freed + lease_parse(s)
      end
    end
    redis.call('ZREM', leases, unpack(gone))
    redis.call('HDEL', lease, unpack(gone))
    redis.call('HINCRBY', budget, 'reserved', int(-freed))
  end
end

-- Spend and reservations now: {daily, monthly, total}, reserved. Absent fields are 0.
local function budget_state(budget, ids)
  local v = redis.call('HMGET', budget, ids[1], ids[2], ids[3], 'reserved')
  return {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0}, tonumber(v[4]) or 0
end
