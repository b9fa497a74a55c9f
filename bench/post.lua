-- wrk script for the flare-cds benchmark: POST one JSON body, check each answer, report as JSON.
--
-- Parameters come from the environment so this file never changes between runs:
--   BENCH_BODY_FILE  the request body (read once per wrk thread)
--   BENCH_EXPECT     a substring every 200 answer must contain (e.g. "indicator":"warning");
--                    a 200 without it counts as an error, so a broken service cannot look fast.

local body_file = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is not set")
local expect = os.getenv("BENCH_EXPECT") or ""
local handle = assert(io.open(body_file, "rb"))
local body = handle:read("*a")
handle:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"

-- Per-thread counter: response() runs in each thread's own Lua state.
unexpected = 0

function response(status, headers, response_body)
  if status >= 200 and status < 300 and expect ~= "" then
    if not string.find(response_body, expect, 1, true) then
      unexpected = unexpected + 1
    end
  end
end

-- setup() and done() run in the main Lua state; keep the threads to read their counters.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local wrong = 0
  for _, thread in ipairs(threads) do
    wrong = wrong + (thread:get("unexpected") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f,"stdev":%.1f},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"unexpected_body":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, latency.stdev,
    e.connect, e.read, e.write, e.status, e.timeout, wrong))
end
