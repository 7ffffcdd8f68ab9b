-- wrk script for bench/reload/run.sh: counts responses by status class in every thread and
-- prints one machine-readable summary line (BENCH ...) when the run ends.
--
-- wrk runs one Lua state per thread; setup() keeps a handle on each so done() can add up their
-- counters. The response() hook makes wrk parse every response, which is what lets us count
-- non-2xx exactly (wrk's own "Non-2xx or 3xx" line only counts status > 399).

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   ok = 0       -- 2xx
   non2xx = 0   -- anything else
   first_bad = ""
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      ok = ok + 1
   else
      non2xx = non2xx + 1
      if first_bad == "" then first_bad = tostring(status) end
   end
end

function done(summary, latency, requests)
   local ok_total, bad_total, bad_first = 0, 0, ""
   for _, t in ipairs(threads) do
      ok_total = ok_total + t:get("ok")
      bad_total = bad_total + t:get("non2xx")
      local fb = t:get("first_bad")
      if bad_first == "" and fb ~= nil then bad_first = fb end
   end
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d ok=%d non2xx=%d first_non2xx=%s connect=%d read=%d write=%d timeout=%d " ..
      "status_errors=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d\n",
      summary.requests, ok_total, bad_total, (bad_first == "" and "-" or bad_first),
      e.connect, e.read, e.write, e.timeout, e.status,
      summary.duration, latency:percentile(50), latency:percentile(99), latency.max))
end
