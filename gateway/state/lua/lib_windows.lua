-- lib_windows: the clock and the UTC calendar periods, as gateway/state/windows.py.
-- Times are integer milliseconds since the epoch; Lua doubles hold them exactly.

local DAY_MS = 86400000
local MINUTE_MS = 60000

-- ARGV's time in ms, or the Redis server clock when it is '0'.
local function clock_ms(arg)
  local now = tonumber(arg)
  if now and now > 0 then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- (year, month, day) of a day number counted from 1970-01-01 (Howard Hinnant's
-- civil_from_days: 400-year eras of 146097 days, years starting on March 1st).
local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  return y, m, d
end

-- Ids of the daily, monthly and total periods containing ms: 'd20261126', 'm202611', 't'.
local function period_ids(ms)
  local y, m, d = civil_from_days(math.floor(ms / DAY_MS))
  return {string.format('d%04d%02d%02d', y, m, d), string.format('m%04d%02d', y, m), 't'}
end

local function minute_of(ms)
  return math.floor(ms / MINUTE_MS)
end

-- An integer as Redis wants it in a command ("%d", never "1e+15").
local function int(n)
  return string.format('%d', n)
end
