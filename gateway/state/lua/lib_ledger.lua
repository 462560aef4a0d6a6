-- lib_ledger: append one row to a tenant's ledger stream.
-- Entry ids are '<now ms>-<seq>', kept increasing even if the clock passed in ARGV steps
-- back, so a row's entry id is never earlier than the time it was written.
-- requires lib_windows (int).

local function ledger_append(stream, now, fields)
  local ms = now
  local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if top[1] then
    local last = tonumber(string.match(top[1][1], '^(%d+)'))
    if last > ms then
      ms = last
    end
  end
  return redis.call('XADD', stream, int(ms) .. '-*', unpack(fields))
end
