-- lib_leases: reservations held by requests in flight, and the money they hold.
--   budget  hash  'reserved' -> sum of the live leases' amounts (nanos)
--   leases  zset  reservation id -> lease expiry (ms); ZCARD = requests in flight
--   lease   hash  reservation id -> 'amount tokens minute[ k=<key>][ e=<end user>][ p]'
--   rl      hash  'c:<key>' -> requests in flight of a key with limits of its own
--   eu:<id> hash  an end user's 'reserved' and 'live' (requests in flight), and more:
--                 see end_user_state below
-- requires lib_windows (int).

-- A lease: 'amount tokens minute', then ' k=<key>' when the key has limits of its own,
-- ' e=<end user>' when it was admitted for an end user, ' p' when paid from the end
-- user's prepaid credits. (A bare fourth field is a key, as version 1 leases wrote it.)
local function lease_parse(s)
  local amount, tokens, minute, rest = string.match(s, '^(%S+) (%S+) (%S+)(.*)$')
  local key, end_user, prepaid = '', '', false
  for tok in string.gmatch(rest, '%S+') do
    local k, e = string.match(tok, '^k=(.*)$'), string.match(tok, '^e=(.*)$')
    if k then
      key = k
    elseif e then
      end_user = e
    elseif tok == 'p' then
      prepaid = true
    else
      key = tok
    end
  end
  return tonumber(amount), tonumber(tokens), tonumber(minute), key, end_user, prepaid
end

-- The hash of end user ``id`` of the tenant whose budget key is ``budget``
-- ('<prefix>:v1:{<tenant>}:budget' -> '<prefix>:v1:{<tenant>}:eu:<id>', same slot).
local function end_user_key(budget, id)
  return string.sub(budget, 1, #budget - 6) .. 'eu:' .. id
end

-- The list of end user ``id``'s entry ids in the tenant's ledger stream, oldest first
-- (a list of ids costs ~20 bytes a row; a stream of copies, 4.7 KB per end user).
local function end_user_ledger_key(budget, id)
  return string.sub(budget, 1, #budget - 6) .. 'eu-ledger:' .. id
end

-- A lease ended (settled or lapsed): its key and its end user hold it no more.
local function lease_done(budget, rl, amount, key, end_user)
  if key and key ~= '' then
    if redis.call('HINCRBY', rl, 'c:' .. key, -1) <= 0 then
      redis.call('HDEL', rl, 'c:' .. key)
    end
  end
  if end_user and end_user ~= '' then
    local eu = end_user_key(budget, end_user)
    redis.call('HINCRBY', eu, 'reserved', int(-amount))
    redis.call('HINCRBY', eu, 'live', -1)
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
        local amount, _, _, key, end_user = lease_parse(s)
        freed = freed + amount
        lease_done(budget, rl, amount, key, end_user)
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

-- An end user's state: spend per period {daily, monthly, total}, reserved, requests in
-- flight, balance of prepaid credits, and its rate-limit minute, requests and tokens.
local function end_user_state(eu, ids, m)
  local v = redis.call('HMGET', eu, ids[1], ids[2], ids[3], 'reserved', 'live', 'balance', 'rl')
  local st = {
    spent = {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0},
    reserved = tonumber(v[4]) or 0, live = tonumber(v[5]) or 0, balance = tonumber(v[6]) or 0,
    requests = 0, tokens = 0,
  }
  if v[7] then
    local em, er, et = string.match(v[7], '^(%S+) (%S+) (%S+)$')
    if tonumber(em) == m then
      st.requests, st.tokens = tonumber(er), tonumber(et)
    end
  end
  return st
end

-- A script's reply ends with an end user's state, when there is one: spent daily,
-- monthly, total, reserved, requests in flight, balance.
local function append_end_user_state(out, st)
  if st then
    for _, v in ipairs({st.spent[1], st.spent[2], st.spent[3], st.reserved, st.live,
        st.balance}) do
      out[#out + 1] = v
    end
  end
  return out
end
