-- Deliver a flush of stream messages: PUBLISH on each request's channel, XADD to its replay log,
-- fenced by the attempt exactly as the row writes are (streaming/publisher.py loads this).
--
-- KEYS: per message its replay log, then its fence (a hash: `a` the newest attempt that
-- published, `n` the next seq, `end` once a done/error went out).
-- ARGV[1]: the TTL of both; ARGV[2]: the log's TTL once its final message went out (the row
-- holds the answer by then); then per message: channel, payload, attempts, mode.
-- mode 0: a worker's message (refused once a later attempt has published);
-- mode 1: a take-over (the janitor's reset: refused unless every earlier attempt is older);
-- mode 2: the final done/error (then nothing more goes out for the request).
-- `attempts` is the fencing token: the row's attempts times 1024 plus the worker's restarts of
-- the same attempt (streaming/publisher.py's fence_token).
-- The seq in the payload is replaced by the fence's `n`, so seq counts without a gap or a
-- reuse whoever publishes. With no fence, only a message of seq 0 starts a log: a later one
-- means Redis lost the log's start (restarted empty), and is refused with -2 so that no log
-- begins past 0 (the worker starts the answer again in a new log).
-- Returns per message the seq it went out with, -1 when the fence refused it, -2 when the
-- log's start was lost.
local ttl, done_ttl = ARGV[1], ARGV[2]
local out = {}
local seen = {}
for i = 1, #KEYS / 2 do
  local log, fence = KEYS[2 * i - 1], KEYS[2 * i]
  local channel, payload = ARGV[4 * i - 1], ARGV[4 * i]
  local attempts, mode = tonumber(ARGV[4 * i + 1]), tonumber(ARGV[4 * i + 2])
  local state = redis.call('HMGET', fence, 'a', 'n', 'end')
  local owner, nxt = tonumber(state[1]), tonumber(state[2])
  local allowed = not state[3] and (owner == nil or attempts > owner
    or (attempts == owner and mode ~= 1))
  local seq = nxt or tonumber(string.match(payload, '"seq":(%d+)')) or 0
  if allowed and nxt == nil and seq > 0 then
    out[i] = -2
  elseif allowed then
    payload = string.gsub(payload, '"seq":%d+', '"seq":' .. seq, 1)
    redis.call('PUBLISH', channel, payload)
    redis.call('XADD', log, '*', 'm', payload)
    if mode == 2 then
      redis.call('HSET', fence, 'a', attempts, 'n', seq + 1, 'end', 1)
    else
      redis.call('HSET', fence, 'a', attempts, 'n', seq + 1)
    end
    if not seen[log] then
      seen[log] = true
      redis.call('EXPIRE', log, ttl)
      redis.call('EXPIRE', fence, ttl)
    end
    if mode == 2 then
      redis.call('EXPIRE', log, done_ttl)
    end
    out[i] = seq
  else
    out[i] = -1
  end
end
return out
