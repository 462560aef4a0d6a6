-- settle_v1: release a reservation, charge, correct tpm and append the ledger row, at once.
-- The same algorithm as Accounts.settle in gateway/state/accounts.py, step for step.
-- requires: lib_windows, lib_leases, lib_ledger
--
-- KEYS[1] budget  hash  spend per period id ('d20261126', 'm202611', 't'), 'reserved'
-- KEYS[2] leases  zset  reservation id -> expiry (ms)
-- KEYS[3] lease   hash  reservation id -> 'amount tokens minute[ key]'
-- KEYS[4] rl      hash  'minute', 'requests', 'tokens' of the current rate-limit minute,
--                       and per key 'k:<key>' -> 'minute requests tokens', 'c:<key>'
-- KEYS[5] ledger  stream of ledger rows
-- ARGV[1] now (ms; '0': the Redis clock)     ARGV[2] reservation id
-- ARGV[3] charge: the actual cost (nanos)     ARGV[4] actual minus admitted tokens
-- ARGV[5..7] daily, monthly, total budget (nanos; '': no limit)
-- ARGV[8..] the ledger row as field, value, ... without 'cost' and 'overrun', which this
--   script sets to what it charged and what it did not
-- Returns {charged (nanos), overrun (nanos), now (ms), spent daily, spent monthly,
--   spent total, reserved (nanos), ledger entry id}

local budget, leases, lease, rl, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = clock_ms(ARGV[1])
local id = ARGV[2]
local charge = math.max(tonumber(ARGV[3]), 0)
local tokens_delta = tonumber(ARGV[4])
local limits = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])}

expire_leases(budget, leases, lease, rl, now)
local ids = period_ids(now)
local spent, reserved = budget_state(budget, ids)

local charged
local held = redis.call('HGET', lease, id)
if held then
  local amount, _, lease_minute, key = lease_parse(held)
  redis.call('ZREM', leases, id)
  redis.call('HDEL', lease, id)
  reserved = tonumber(redis.call('HINCRBY', budget, 'reserved', int(-amount)))
  charged = math.min(charge, amount)
  local m = minute_of(now)
  if lease_minute == m then
    local rl_state = redis.call('HMGET', rl, 'minute', 'tokens')
    if tonumber(rl_state[1]) == m then
      local used = math.max(tonumber(rl_state[2]) + tokens_delta, 0)
      redis.call('HSET', rl, 'tokens', int(used))
    end
    if key ~= '' then
      local s = redis.call('HGET', rl, 'k:' .. key)
      if s then
        local km, kr, kt = string.match(s, '^(%S+) (%S+) (%S+)$')
        if tonumber(km) == m then
          local kused = math.max(tonumber(kt) + tokens_delta, 0)
          redis.call('HSET', rl, 'k:' .. key, km .. ' ' .. kr .. ' ' .. int(kused))
        end
      end
    end
  end
  key_done(rl, key)
else
  -- The lease lapsed: charge only what still fits, never overspend.
  charged = charge
  for i = 1, 3 do
    if limits[i] then
      charged = math.min(charged, math.max(limits[i] - spent[i] - reserved, 0))
    end
  end
end

if charged > 0 then
  for i = 1, 3 do
    spent[i] = tonumber(redis.call('HINCRBY', budget, ids[i], int(charged)))
  end
  -- Keep only the current periods (and 'reserved'): the hash never needs a TTL.
  if redis.call('HLEN', budget) > 4 then
    local keep = {reserved = true, [ids[1]] = true, [ids[2]] = true, [ids[3]] = true}
    for _, field in ipairs(redis.call('HKEYS', budget)) do
      if not keep[field] then
        redis.call('HDEL', budget, field)
      end
    end
  end
end

local overrun = math.max(tonumber(ARGV[3]) - charged, 0)
local row = {'cost', int(charged), 'overrun', int(overrun)}
for i = 8, #ARGV do
  row[#row + 1] = ARGV[i]
end
local entry = ledger_append(ledger, now, row)
return {charged, overrun, now, spent[1], spent[2], spent[3], reserved, entry}
