-- wrk script: POST /keys with a small JSON body, cycling over KEYS keys.
-- At the end it prints one JSON line that benchmarks/throughput.py reads.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- A bearer token, for a cluster with AUTH_FILE (benchmarks/throughput.py --security).
local token = os.getenv("KV_BENCH_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end

local keys = tonumber(os.getenv("KV_BENCH_KEYS") or "100")
local counter = 0

request = function()
  counter = counter + 1
  local body = '{"key":"bench-' .. (counter % keys) .. '","value":{"n":' .. counter .. '}}'
  return wrk.format(nil, nil, nil, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
