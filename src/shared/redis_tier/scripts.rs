//! The Lua scripts of the shared tier. Each touches the keys of one identity
//! only (one hash tag), or the fleet's key only, so in a Cluster it runs on
//! the node of that slot.
//!
//! Generations, epochs and sequence numbers never pass through Lua's numbers
//! (doubles): a counter is a decimal string of at most 17 digits, checked by
//! `counter` before anything uses it, compared as a string (`less`), and
//! moved on by Redis's own 64-bit `INCR`/`HINCRBY`, which refuse to overflow
//! (17 digits are far from it). Anything else Redis holds there (a value
//! written by hand, a huge or negative number, garbage) is not believable:
//! the scripts never do arithmetic on it and say so, and the replica raises
//! the fleet's epoch.

/// Shared by every script below.
const PRELUDE: &str = r"
local function counter(s)
  if s == false or s == nil then return '0' end
  if type(s) ~= 'string' or #s > 17 then return nil end
  if s == '0' or string.match(s, '^[1-9][0-9]*$') then return s end
  return nil
end
local function less(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function now()
  local t = redis.call('TIME')
  return t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
end
";

/// Takes the lock when it is free; returns whether it did, the key's
/// generation, its current value, and what was odd about the generation:
/// 0 nothing, 1 below the lowest this replica accepts (raised to it), 2 not
/// believable (replaced, and the entry dropped).
/// KEYS: entry, lock, generation. ARGV: owner, lock ms, lowest, generation ms.
pub(super) fn claim() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local value = redis.call('GET', KEYS[1]) or ''
local lowest = counter(ARGV[3]) or '0'
local generation = counter(redis.call('GET', KEYS[3]))
local odd = 0
if generation == nil then
  odd = 2
  generation = now()
  if less(generation, lowest) then generation = lowest end
  value = ''
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[3], generation, 'PX', ARGV[4])
elseif less(generation, lowest) then
  odd = 1
  generation = lowest
  redis.call('SET', KEYS[3], generation, 'PX', ARGV[4])
end
local acquired = 0
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then acquired = 1 end
return {acquired, generation, value, odd}
"
    )
}

/// Writes (or, given an empty value, deletes) the entry only if the key's
/// generation is still the one the fetch began with, keeping the generation
/// at least as long as the entry, then releases the lock if this fetch still
/// holds it and wakes the replicas waiting for it.
/// KEYS: entry, generation, lock. ARGV: generation, owner, value, value ms,
/// channel, name, generation ms.
pub(super) const STORE: &str = r"
local stored = 0
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1] then
  if ARGV[3] == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  end
  if ARGV[1] ~= '0' then redis.call('PEXPIRE', KEYS[2], ARGV[7]) end
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

/// Drops the entry and moves the generation on; returns the new generation
/// and whether the old one was not believable (1) and so was replaced. A
/// generation is at least Redis's clock in microseconds and above the
/// lowest this replica accepts, so one made after Redis lost its keys (a
/// restart, a restore) is still above every generation a replica remembers.
/// The replica publishes the invalidation itself, sealed with the generation.
/// KEYS: entry, generation. ARGV: generation ms, lowest.
pub(super) fn invalidate() -> String {
    format!(
        "{PRELUDE}{}",
        r"
redis.call('DEL', KEYS[1])
local current = counter(redis.call('GET', KEYS[2]))
local replaced = 0
if current == nil then
  replaced = 1
  current = '0'
end
local lowest = counter(ARGV[2]) or '0'
if less(current, lowest) then current = lowest end
local t = now()
if less(current, t) then
  redis.call('SET', KEYS[2], t, 'PX', ARGV[1])
else
  redis.call('SET', KEYS[2], current)
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return {redis.call('GET', KEYS[2]), replaced}
"
    )
}

/// The fleet's epoch, invalidation sequence and the tip of its last
/// advance ('' where not believable), created at 0 if absent (so a snapshot
/// holds them), and the replica's canary published on its own channel, all
/// in one round trip. KEYS: fleet. ARGV: canary channel, sealed canary.
pub(super) fn fleet() -> String {
    format!(
        "{PRELUDE}{}",
        r"
redis.call('HSETNX', KEYS[1], 'epoch', '0')
redis.call('HSETNX', KEYS[1], 'sequence', '0')
redis.call('PUBLISH', ARGV[1], ARGV[2])
local epoch = counter(redis.call('HGET', KEYS[1], 'epoch')) or ''
local sequence = counter(redis.call('HGET', KEYS[1], 'sequence')) or ''
local tip = counter(redis.call('HGET', KEYS[1], 'tip')) or ''
return {epoch, sequence, tip}
"
    )
}

/// Advances the fleet's invalidation sequence and names the advance with
/// the tip given; returns the epoch, the new sequence and the tip, or ''
/// for all (and changes nothing) when epoch or sequence is not believable.
/// KEYS: fleet. ARGV: tip.
pub(super) fn advance() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local epoch = counter(redis.call('HGET', KEYS[1], 'epoch'))
local sequence = counter(redis.call('HGET', KEYS[1], 'sequence'))
if epoch == nil or sequence == nil then return {'', '', ''} end
redis.call('HSET', KEYS[1], 'epoch', epoch, 'tip', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'sequence', 1)
return {epoch, redis.call('HGET', KEYS[1], 'sequence'), ARGV[1]}
"
    )
}

/// Raises the epoch past both Redis's and the replica's, and the sequence
/// to at least the replica's; returns the new epoch and sequence.
/// KEYS: fleet. ARGV: the replica's epoch, its sequence.
pub(super) fn raise() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local epoch = counter(redis.call('HGET', KEYS[1], 'epoch')) or '0'
local sequence = counter(redis.call('HGET', KEYS[1], 'sequence')) or '0'
local known_epoch = counter(ARGV[1]) or '0'
local known_sequence = counter(ARGV[2]) or '0'
if less(epoch, known_epoch) then epoch = known_epoch end
if less(sequence, known_sequence) then sequence = known_sequence end
redis.call('HSET', KEYS[1], 'epoch', epoch, 'sequence', sequence)
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
return {redis.call('HGET', KEYS[1], 'epoch'), sequence}
"
    )
}

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

/// The largest counter the scripts believe, plus one: 17 decimal digits.
pub(super) const COUNTER_LIMIT: u64 = 100_000_000_000_000_000;

/// A counter a script returned, if believable (the scripts' own rule).
pub(super) fn believable(text: &str) -> Option<u64> {
    let digits = text.bytes().all(|b| b.is_ascii_digit());
    let canonical = text == "0" || !text.starts_with('0');
    let value: u64 = text.parse().ok()?;
    (digits && canonical && value < COUNTER_LIMIT).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_decimal_counters_below_the_limit_are_believed() {
        assert_eq!(believable("0"), Some(0));
        assert_eq!(believable("1764841234123456"), Some(1_764_841_234_123_456));
        assert_eq!(believable("99999999999999999"), Some(COUNTER_LIMIT - 1));
        for not in [
            "",
            "100000000000000000",
            "18446744073709551615",
            "-9223372036854775808",
            "-1",
            "+1",
            "01",
            "1e15",
            "1.5",
            " 1",
            "garbage",
        ] {
            assert_eq!(believable(not), None, "{not:?}");
        }
    }
}
