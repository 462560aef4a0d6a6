-- lib_leases: reservations held by requests in flight, and the money they hold.
--   budget  hash  'reserved' -> sum of the live leases' amounts (nanos)
--   leases  zset  reservation id -> lease expiry (ms); ZCARD = requests in flight
--   lease   hash  reservation id -> 'amount tokens minute[ key]'
--   rl      hash  'c:<key>' -> requests in flight of a key with limits of its own
-- requires lib_windows (int).

local function lease_parse(s)
  local amount, tokens, minute, key = string.match(s, '^(%S+) (%S+) (%S+) ?(%S*)$')
  return tonumber(amount), tonumber(tokens), tonumber(minute), key
end

-- A lease of a key with its own limits ended: one request fewer in flight for the key.
local function key_done(rl, key)
  if key and key ~= '' then
    if redis.call('HINCRBY', rl, 'c:' .. key, -1) <= 0 then
      redis.call('HDEL', rl, 'c:' .. key)
    end
  end
end

-- Drop every lease that expired at or before now and give its amount back.
-- Batches keep unpack() far below Lua's stack limit after a mass expiry.
local function expire_leases(budget, leases, lease, rl, now)
  while true do
    local gone = redis.call('ZRANGEBYSCORE', leases, '-inf', int(now), 'LIMIT', 0, 500)
    if #gone == 0 then
      return
    end
    local freed = 0
    for _, id in ipairs(gone) do
      local s = redis.call('HGET', lease, id)
      if s then
        local amount, _, _, key = lease_parse(s)
        freed = freed + amount
        key_done(rl, key)
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
