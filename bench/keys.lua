-- wrk script: each request asks for a random key of the warmed set, on the
-- drop-in path every target serves, and the run ends with one RESULT line:
-- requests/s, p50, p99 and p99.9 in ms, and errors (statuses over 399 included).
-- SEQUENTIAL=1 asks for FIRST, FIRST+1, … instead: every request a new key.
local keys = tonumber(os.getenv("KEYS") or "30000")
local first = tonumber(os.getenv("FIRST") or "0")
local sequential = os.getenv("SEQUENTIAL") == "1"
local headers = {}
if os.getenv("BEARER") and os.getenv("BEARER") ~= "" then
  headers["Authorization"] = "Bearer " .. os.getenv("BEARER")
end
local next_key = first

math.randomseed(os.time())

request = function()
  local i
  if sequential then
    i = next_key
    next_key = next_key + 1
  else
    i = first + math.random(0, keys - 1)
  end
  return wrk.format("GET", "/ext/get-user-token?email=user" .. i .. "%40example.com&type=AGENT", headers)
end

done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout + summary.errors.status
  io.write(string.format("RESULT %.0f %.3f %.3f %.3f %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, errors))
end
