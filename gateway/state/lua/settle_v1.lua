-- settle_v1: release a reservation, charge, correct tpm and append the ledger row, at once.
-- The same algorithm as Accounts.settle in gateway/state/accounts.py, step for step.
-- requires: lib_windows, lib_leases, lib_ledger
--
-- KEYS[1] budget  hash  spend per period id ('d20261126', 'm202611', 't'), 'reserved'
-- KEYS[2] leases  zset  reservation id -> expiry (ms)
-- KEYS[3] lease   hash  reservation id -> 'amount tokens minute[ k=<key>][ e=<eu>][ p]'
-- KEYS[4] rl      hash  'minute', 'requests', 'tokens' of the current rate-limit minute,
--                       and per key 'k:<key>' -> 'minute requests tokens', 'c:<key>'
-- KEYS[5] ledger  stream of ledger rows
-- KEYS[6] eu      hash    the end user's, when there is one (see admit_v1)
-- KEYS[7] eu ledger list    ids of the end user's entries in the ledger stream
-- ARGV[1] now (ms; '0': the Redis clock)     ARGV[2] reservation id
-- ARGV[3] charge: the actual cost (nanos)     ARGV[4] actual minus admitted tokens
-- ARGV[5..7] daily, monthly, total budget (nanos; '': no limit)
-- ARGV[8] the end user's id or ''; ARGV[9..11] its daily, monthly, total budget;
--   ARGV[12] '1' when it pays from prepaid credits (these apply if the lease lapsed)
-- ARGV[13..] the ledger row as field, value, ... without 'cost', 'overrun' and
--   'credit', which this script sets to what it charged, what it did not, and the
--   change of the end user's balance
-- Returns {charged (nanos), overrun (nanos), now (ms), spent daily, spent monthly,
--   spent total, reserved (nanos), ledger entry id, credit (nanos), and for an end user:
--   spent daily, monthly, total, reserved, requests in flight, balance (nanos)}

local budget, leases, lease, rl, ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = clock_ms(ARGV[1])
local id = ARGV[2]
local charge = math.max(tonumber(ARGV[3]), 0)
local tokens_delta = tonumber(ARGV[4])
local limits = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])}

expire_leases(budget, leases, lease, rl, now)
local ids = period_ids(now)
local spent, reserved = budget_state(budget, ids)
local m = minute_of(now)

local charged, end_user, prepaid
local held = redis.call('HGET', lease, id)
if held then
  local amount, _, lease_minute, key
  amount, _, lease_minute, key, end_user, prepaid = lease_parse(held)
  redis.call('ZREM', leases, id)
  redis.call('HDEL', lease, id)
  reserved = tonumber(redis.call('HINCRBY', budget, 'reserved', int(-amount)))
  charged = math.min(charge, amount)
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
    if end_user ~= '' then
      local eu = end_user_key(budget, end_user)
      local s = redis.call('HGET', eu, 'rl')
      if s then
        local em, er, et = string.match(s, '^(%S+) (%S+) (%S+)$')
        if tonumber(em) == m then
          local eused = math.max(tonumber(et) + tokens_delta, 0)
          redis.call('HSET', eu, 'rl', em .. ' ' .. er .. ' ' .. int(eused))
        end
      end
    end
  end
  lease_done(budget, rl, amount, key, end_user)
else
  -- The lease lapsed: charge only what still fits, never overspend.
  charged = charge
  for i = 1, 3 do
    if limits[i] then
      charged = math.min(charged, math.max(limits[i] - spent[i] - reserved, 0))
    end
  end
  end_user, prepaid = ARGV[8], ARGV[12] == '1'
  if end_user ~= '' then
    local st = end_user_state(end_user_key(budget, end_user), ids, m)
    for i = 1, 3 do
      local limit = tonumber(ARGV[8 + i])
      if limit then
        charged = math.min(charged, math.max(limit - st.spent[i] - st.reserved, 0))
      end
    end
    if prepaid then
      charged = math.min(charged, math.max(st.balance - st.reserved, 0))
    end
  end
end

-- Add the charge to each current period of hash h; keep only those periods (and the
-- fields named in keep): the hashes never need a TTL. Returns the new spend.
local function add_spend(h, keep)
  local out = {}
  for i = 1, 3 do
    out[i] = tonumber(redis.call('HINCRBY', h, ids[i], int(charged)))
  end
  if redis.call('HLEN', h) > 3 + #keep then
    local kept = {[ids[1]] = true, [ids[2]] = true, [ids[3]] = true}
    for _, f in ipairs(keep) do
      kept[f] = true
    end
    for _, field in ipairs(redis.call('HKEYS', h)) do
      if not kept[field] then
        redis.call('HDEL', h, field)
      end
    end
  end
  return out
end

local credit = 0
local eu
if end_user ~= '' then
  eu = end_user_key(budget, end_user)
  if prepaid then
    credit = -charged
  end
end
if charged > 0 then
  spent = add_spend(budget, {'reserved'})
  if eu then
    add_spend(eu, {'reserved', 'live', 'balance', 'rl'})
    if credit ~= 0 then
      redis.call('HINCRBY', eu, 'balance', int(credit))
    end
  end
end

local overrun = math.max(tonumber(ARGV[3]) - charged, 0)
local row = {'cost', int(charged), 'overrun', int(overrun), 'credit', int(credit)}
for i = 13, #ARGV do
  row[#row + 1] = ARGV[i]
end
local entry = ledger_append(ledger, now, row)
local out = {charged, overrun, now, spent[1], spent[2], spent[3], reserved, entry, credit}
if eu then
  redis.call('RPUSH', end_user_ledger_key(budget, end_user), entry)
  append_end_user_state(out, end_user_state(eu, ids, m))
end
return out
