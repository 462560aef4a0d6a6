-- lib_ledger: append one row to a tenant's ledger stream.
-- Entry ids are '<now ms>-<seq>', kept increasing even if the clock passed in ARGV steps
-- back, so a row's entry id is never earlier than the time it was written.
-- requires lib_windows (int).

local function ledger_append(stream, now, fields)
  -- Refused only when the stream's last entry is later than now (a clock that stepped
  -- back); reading that entry first on every append cost more than the append itself.
  local added = redis.pcall('XADD', stream, int(now) .. '-*', unpack(fields))
  if type(added) ~= 'table' then
    return added
  end
  local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  local last = top[1] and tonumber(string.match(top[1][1], '^(%d+)')) or now
  return redis.call('XADD', stream, int(math.max(now, last)) .. '-*', unpack(fields))
end
