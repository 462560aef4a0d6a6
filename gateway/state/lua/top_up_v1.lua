-- top_up_v1: add prepaid credits to an end user's balance and append the ledger row, at
-- once, unless the idempotency key was used before.
-- requires: lib_windows, lib_ledger
--
-- KEYS[1] eu         hash    the end user's ('balance', see admit_v1)
-- KEYS[2] top-ups    hash    idempotency key -> 'end_user nanos row_id' (kept: a retried
--                            top-up is recognised however late it comes)
-- KEYS[3] ledger     stream  the tenant's ledger rows
-- KEYS[4] eu ledger  list    ids of the end user's entries in the ledger stream
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2] idempotency key   ARGV[3] end user
-- ARGV[4] amount (nanos, > 0)   ARGV[5] the row's id   ARGV[6..] the row: field, value, ...
-- Returns {'applied' | 'replayed' | 'mismatch', row id, balance (nanos)}

local eu, top_ups, ledger, eu_ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = clock_ms(ARGV[1])
local key, end_user, amount, row_id = ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local prior = redis.call('HGET', top_ups, key)
if prior then
  local p_user, p_amount, p_row = string.match(prior, '^(%S+) (%S+) (%S+)$')
  local balance = tonumber(redis.call('HGET', eu, 'balance')) or 0
  local same = p_user == end_user and p_amount == amount
  return {same and 'replayed' or 'mismatch', p_row, balance}
end
redis.call('HSET', top_ups, key, end_user .. ' ' .. amount .. ' ' .. row_id)
local balance = redis.call('HINCRBY', eu, 'balance', amount)
local row = {}
for i = 6, #ARGV do
  row[#row + 1] = ARGV[i]
end
local entry = ledger_append(ledger, now, row)
redis.call('RPUSH', eu_ledger, entry)
return {'applied', row_id, balance}
