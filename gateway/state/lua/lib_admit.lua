-- lib_admit: check rate limits and every budget window, then count and reserve, at once.
-- The same algorithm as Accounts.admit in gateway/state/accounts.py, step for step.
-- admit(K, A) takes admit_v1's KEYS and ARGV (see there) as the tables K and A, so a
-- script can admit after work of its own (cache_admit_v1).
-- requires lib_windows, lib_leases.

local function admit(K, A)
  local budget, leases, lease, rl = K[1], K[2], K[3], K[4]
  local now = clock_ms(A[1])
  local id = A[2]
  local amount, tokens, lease_ms = tonumber(A[3]), tonumber(A[4]), tonumber(A[5])
  local min_amount = tonumber(A[6])
  local count = A[7] == '1'
  local rpm, tpm, concurrent = tonumber(A[8]), tonumber(A[9]), tonumber(A[10])
  local limits = {tonumber(A[11]), tonumber(A[12]), tonumber(A[13])}
  local key = A[14]
  local key_rpm, key_tpm, key_concurrent = tonumber(A[15]), tonumber(A[16]), tonumber(A[17])
  local end_user = A[18] or ''
  local WINDOWS = {'daily', 'monthly', 'total'}

  expire_leases(budget, leases, lease, rl, now)
  local ids = period_ids(now)
  local spent, reserved = budget_state(budget, ids)

  local m = minute_of(now)
  local rl_state = redis.call('HMGET', rl, 'minute', 'requests', 'tokens')
  local requests, used = 0, 0
  if tonumber(rl_state[1]) == m then
    requests, used = tonumber(rl_state[2]), tonumber(rl_state[3])
  end

  local key_requests, key_used = 0, 0
  if key ~= '' then
    local s = redis.call('HGET', rl, 'k:' .. key)
    if s then
      local km, kr, kt = string.match(s, '^(%S+) (%S+) (%S+)$')
      if tonumber(km) == m then
        key_requests, key_used = tonumber(kr), tonumber(kt)
      end
    end
  end

  local eu, st
  if end_user ~= '' then
    eu = K[5]
    st = end_user_state(eu, ids, m)
  end

  local function reply(ok, granted, by, window, retry)
    local r = {ok, granted, now, by, window, retry, spent[1], spent[2], spent[3], reserved,
      m, requests, used, key_requests, key_used}
    return append_end_user_state(r, st)
  end

  -- Rate limits: the tenant's, then the key's own, then the end user's. The requests in
  -- flight are looked up only where a concurrency limit is set.
  local until_next_minute = (m + 1) * MINUTE_MS - now
  -- (Named fields: a limit that is not set is nil, which a positional table cannot hold.)
  local scopes = {
    {scope = '', rpm = rpm, tpm = tpm, concurrent = concurrent, requests = requests,
      used = used, live = function() return redis.call('ZCARD', leases) end},
  }
  if key ~= '' then
    scopes[#scopes + 1] = {scope = 'key_', rpm = key_rpm, tpm = key_tpm,
      concurrent = key_concurrent, requests = key_requests, used = key_used,
      live = function() return tonumber(redis.call('HGET', rl, 'c:' .. key)) or 0 end}
  end
  if st then
    scopes[#scopes + 1] = {scope = 'end_user_', rpm = tonumber(A[19]),
      tpm = tonumber(A[20]), concurrent = tonumber(A[21]), requests = st.requests,
      used = st.tokens, live = function() return st.live end}
  end
  for _, sc in ipairs(scopes) do
    if count and sc.rpm and sc.requests + 1 > sc.rpm then
      return reply(0, 0, sc.scope .. 'rpm', '', until_next_minute)
    end
    if sc.tpm and sc.used + tokens > sc.tpm then
      return reply(0, 0, sc.scope .. 'tpm', '', until_next_minute)
    end
    if sc.concurrent and sc.live() + 1 > sc.concurrent then
      return reply(0, 0, sc.scope .. 'concurrent', '', 1000)
    end
  end

  -- Every window that applies, the tenant's first: what fits all of them is granted.
  local rooms = {}
  for i = 1, 3 do
    if limits[i] then
      rooms[#rooms + 1] = {'budget', WINDOWS[i], limits[i] - spent[i] - reserved}
    end
  end
  if st then
    for i = 1, 3 do
      local limit = tonumber(A[21 + i])
      if limit then
        rooms[#rooms + 1] = {'end_user_budget', WINDOWS[i], limit - st.spent[i] - st.reserved}
      end
    end
    if A[25] == '1' then
      rooms[#rooms + 1] = {'credits', 'balance', st.balance - st.reserved}
    end
  end
  local granted = amount
  for _, r in ipairs(rooms) do
    if granted > r[3] then
      if min_amount and r[3] >= min_amount then
        granted = r[3]
      else
        return reply(0, 0, r[1], r[2], 0)
      end
    end
  end

  if count then
    requests = requests + 1
  end
  used = used + tokens
  redis.call('HSET', rl, 'minute', int(m), 'requests', int(requests), 'tokens', int(used))

  -- An id admitted twice replaces its lease instead of leaking the first amount.
  local old = redis.call('HGET', lease, id)
  local delta = granted
  if old then
    local old_amount, _, _, old_key, old_end_user = lease_parse(old)
    delta = granted - old_amount
    lease_done(budget, rl, old_amount, old_key, old_end_user)
  end
  local held = int(granted) .. ' ' .. int(tokens) .. ' ' .. int(m)
  if key ~= '' then
    if count then
      key_requests = key_requests + 1
    end
    key_used = key_used + tokens
    redis.call('HSET', rl, 'k:' .. key, int(m) .. ' ' .. int(key_requests) .. ' ' .. int(key_used))
    redis.call('HINCRBY', rl, 'c:' .. key, 1)
    held = held .. ' k=' .. key
  end
  if st then
    if count then
      st.requests = st.requests + 1
    end
    st.tokens = st.tokens + tokens
    redis.call('HSET', eu, 'rl', int(m) .. ' ' .. int(st.requests) .. ' ' .. int(st.tokens))
    st.live = redis.call('HINCRBY', eu, 'live', 1)
    st.reserved = redis.call('HINCRBY', eu, 'reserved', int(granted))
    held = held .. ' e=' .. end_user
    if A[25] == '1' then
      held = held .. ' p'
    end
  end
  redis.call('ZADD', leases, int(now + lease_ms), id)
  redis.call('HSET', lease, id, held)
  reserved = tonumber(redis.call('HINCRBY', budget, 'reserved', int(delta)))
  return reply(1, granted, '', '', 0)
end
