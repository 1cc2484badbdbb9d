//! The Lua scripts of the shared tier. Each touches the keys of one identity
//! only (one hash tag), so in a Cluster it runs on the node of that slot.

/// Takes the lock when it is free; returns whether it did, the key's
/// generation and its current value either way. A generation below the
/// lowest this replica accepts (Redis lost it) is raised to it first.
pub(super) const CLAIM: &str = r"
local value = redis.call('GET', KEYS[1]) or ''
local generation = redis.call('GET', KEYS[3]) or '0'
if tonumber(generation) < tonumber(ARGV[3]) then
  generation = ARGV[3]
  redis.call('SET', KEYS[3], generation, 'PX', ARGV[4])
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, generation, value}
end
return {0, generation, value}
";

/// Writes (or, given an empty value, deletes) the entry only if the key's
/// generation is still the one the fetch began with, then releases the lock
/// if this fetch still holds it and wakes the replicas waiting for it.
pub(super) const STORE: &str = r"
local stored = 0
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1] then
  if ARGV[3] == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  end
  stored = 1
end
if redis.call('GET', KEYS[3]) == ARGV[2] then
  redis.call('DEL', KEYS[3])
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return stored
";

/// Compare-and-delete: releases the lock only if this fetch holds it, and
/// wakes the waiters so one of them takes it.
pub(super) const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
";

/// Drops the entry, moves the generation on and tells every replica;
/// returns the new generation. A generation is at least Redis's clock in
/// microseconds, so one made after Redis lost its keys (a restart, a restore)
/// is still above every generation a replica remembers.
pub(super) const INVALIDATE: &str = r"
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local generation = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
if generation < now then generation = now end
generation = string.format('%d', generation)
redis.call('SET', KEYS[2], generation, 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[1], generation .. ':' .. ARGV[2])
return generation
";

/// GCRA on Redis's own clock: 0 when admitted, else microseconds to wait.
pub(super) const RATE_LIMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > 0 then return wait end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
return 0
";
