package tasking

import "github.com/redis/rueidis"

// The Redis locker's scripts. Each one runs atomically on the server, so a
// batch is checked and written without another worker in between.
//
// Key layout (see redisKeys): KEYS[1] and KEYS[2] are per-namespace keys,
// then every name of every request contributes two keys, its exclusive
// string and its shared sorted set, exclusive names of a request first.
// Every key a script touches is one of its KEYS and all of them carry the
// namespace's hash tag, so a whole batch lives in one Redis Cluster slot.
//
// Times are the server's (redis.call('TIME')), in milliseconds, so the
// workers' clocks never matter.

// dropName frees one name of an owner: an exclusive name's string if the
// owner still holds it, or the owner's place in a shared name's set.
const dropName = `
local function dropName(owner, excl, xk, sk)
  if excl then
    if redis.call('GET', xk) == owner then
      redis.call('DEL', xk)
    end
  else
    redis.call('ZREM', sk, owner)
  end
end
`

// releaseOwners is the loop that releaseLua and acquireLua share: for each
// owner in ARGV[a..last] (owner, #exclusive, #shared), compare-and-delete
// its names, starting at KEYS[k], and drop it from the registry KEYS[regk].
const releaseOwners = dropName + `
while a <= last do
  local owner, nx, ns = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  for i = 0, nx + ns - 1 do
    dropName(owner, i < nx, KEYS[k + 2 * i], KEYS[k + 2 * i + 1])
  end
  redis.call('HDEL', KEYS[regk], owner)
  k = k + 2 * (nx + ns)
end
`

// acquireLua first releases the owners it is given (as releaseLua does), so
// that a request may get what they held, and then grants each request all
// of its names or none. A worker releases the grants of the tasks a step
// finished and acquires for the tasks it claimed in this one call.
//
//	KEYS: fence counter, owner registry, then (exclusive, shared) per name:
//	      the released owners' names, then the requests'
//	ARGV: lease ms, number of released owners, then per released owner:
//	      owner, #exclusive, #shared; then per request: owner, #exclusive,
//	      #shared, registry value
//
// It returns one fencing token per request, 0 for a request that was denied.
// An exclusive name is free when its string is absent and its sorted set has
// no unexpired member (expired members are removed on the way); a shared
// name is free when its string is absent. Tokens are max(last + 1, server
// time in µs): they keep growing even after Redis lost the counter (FLUSHALL,
// a restart without persistence), as long as the server clock does not step
// back, which is also why the counter may expire when the namespace is idle.
var acquireLua = rueidis.NewLuaScript(`
local k, a, regk = 3, 3, 2
local last = 2 + 3 * tonumber(ARGV[2])
` + releaseOwners + `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nowus = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
local out, reg = {}, {}
while a <= #ARGV do
  local owner, nx, ns, regval = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  a = a + 4
  local ok = true
  for i = 0, nx + ns - 1 do
    local xk, sk = KEYS[k + 2 * i], KEYS[k + 2 * i + 1]
    if redis.call('EXISTS', xk) == 1 then
      ok = false
      break
    end
    if i < nx then
      redis.call('ZREMRANGEBYSCORE', sk, '-inf', now)
      if redis.call('ZCARD', sk) > 0 then
        ok = false
        break
      end
    end
  end
  if ok then
    for i = 0, nx + ns - 1 do
      local xk, sk = KEYS[k + 2 * i], KEYS[k + 2 * i + 1]
      if i < nx then
        redis.call('SET', xk, owner, 'PX', lease)
      else
        redis.call('ZADD', sk, now + lease, owner)
        if redis.call('PTTL', sk) < lease then
          redis.call('PEXPIRE', sk, lease)
        end
      end
    end
    reg[#reg + 1] = owner
    reg[#reg + 1] = regval
    fence = math.max(fence + 1, nowus)
    out[#out + 1] = fence
  else
    out[#out + 1] = 0
  end
  k = k + 2 * (nx + ns)
end
if #reg > 0 then
  for i = 1, #reg, 512 do
    redis.call('HSET', KEYS[2], unpack(reg, i, math.min(i + 511, #reg)))
  end
  redis.call('PEXPIRE', KEYS[2], lease)
  redis.call('SET', KEYS[1], string.format('%.0f', fence), 'PX', 86400000)
end
return out
`)

// renewLua extends the leases of a session's grants.
//
//	KEYS: owner registry, then (exclusive, shared) per name
//	ARGV: lease ms, then per owner: owner, #exclusive, #shared
//
// It returns the 1-based positions of the owners that no longer hold all of
// their names (lease ran out, another owner took a name, Redis lost its
// data). What such an owner still holds is freed at once: it is going to be
// canceled, and holding part of its names would only block others.
var renewLua = rueidis.NewLuaScript(dropName + `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local lost = {}
local k, a, idx = 2, 2, 0
while a <= #ARGV do
  idx = idx + 1
  local owner, nx, ns = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local ok = true
  for i = 0, nx + ns - 1 do
    local xk, sk = KEYS[k + 2 * i], KEYS[k + 2 * i + 1]
    if i < nx then
      ok = redis.call('GET', xk) == owner
    else
      local sc = redis.call('ZSCORE', sk, owner)
      ok = sc and tonumber(sc) > now
    end
    if not ok then
      break
    end
  end
  for i = 0, nx + ns - 1 do
    local xk, sk = KEYS[k + 2 * i], KEYS[k + 2 * i + 1]
    if ok and i < nx then
      redis.call('PEXPIRE', xk, lease)
    elseif ok then
      redis.call('ZADD', sk, 'XX', now + lease, owner)
      if redis.call('PTTL', sk) < lease then
        redis.call('PEXPIRE', sk, lease)
      end
    else
      dropName(owner, i < nx, xk, sk)
    end
  end
  if not ok then
    redis.call('HDEL', KEYS[1], owner)
    lost[#lost + 1] = idx
  end
  k = k + 2 * (nx + ns)
end
redis.call('PEXPIRE', KEYS[1], lease)
return lost
`)

// releaseLua is compare-and-delete for a batch of owners: a name is only
// freed if the given owner holds it.
//
//	KEYS: owner registry, then (exclusive, shared) per name
//	ARGV: per owner: owner, #exclusive, #shared
var releaseLua = rueidis.NewLuaScript(`
local k, a, regk, last = 2, 1, 1, #ARGV
` + releaseOwners + `
return 0
`)
