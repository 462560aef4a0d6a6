-- lib_cache: a cached answer, or else the single-flight lease for computing it.
-- requires lib_windows (int).

-- {1, value} on a hit; {0, 1} when the caller now leads the single flight (it took the
-- lease); {0, 0} when another caller holds a live lease (wait, then look again).
local function cache_lookup(cache, flight, now, lease_ms)
  local entry = redis.call('GET', cache)
  if entry then
    local sep = string.find(entry, ':', 1, true)
    if sep and tonumber(string.sub(entry, 1, sep - 1)) > now then
      return {1, string.sub(entry, sep + 1)}
    end
  end
  local held = tonumber(redis.call('GET', flight))
  if held and held > now then
    return {0, 0}
  end
  redis.call('SET', flight, int(now + lease_ms), 'PX', int(math.max(lease_ms, 1)))
  return {0, 1}
end
