-- record_v1: append a ledger row for a request that reserved nothing; touches no money.
-- requires: lib_windows, lib_ledger
--
-- KEYS[1] ledger     stream of ledger rows
-- KEYS[2] eu ledger  list of the row's end user's entry ids, if it names one (else absent)
-- ARGV[1] now (ms; '0': the Redis clock)   ARGV[2..] the row as field, value, ...
-- Returns the ledger entry id.

local now = clock_ms(ARGV[1])
local row = {}
for i = 2, #ARGV do
  row[#row + 1] = ARGV[i]
end
local entry = ledger_append(KEYS[1], now, row)
if KEYS[2] then
  redis.call('RPUSH', KEYS[2], entry)
end
return entry
