-- wrk script for bench/load.py: every connection POSTs the same body (built once by the bench)
-- and logs each request: when it was sent, when its reply was in, and the reply's status.
--
--   wrk -tN -cN -d3600s --timeout 60s -s bench/wrk_post.lua URL BODY_FILE CONTENT_TYPE
--
-- One thread per connection, so that a thread's requests and replies pair up one to one.
-- Times are CLOCK_MONOTONIC seconds (Python's time.monotonic), so that the bench picks its
-- measured window out of one continuous run as its httpx load generator does. On SIGINT wrk
-- stops and done() prints "wrk-summary {...}" (requests, duration, errors by kind), then one
-- "wrk-request SENT ANSWERED STATUS" line per reply (status -1: none came, the connection
-- failed). Needs LuaJIT (wrk's usual build) for the clock.

local ffi = require("ffi")
ffi.cdef([[
   typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
   int clock_gettime(int clock, bench_timespec *now);
]])
local CLOCK_MONOTONIC = 1
local clock = ffi.new("bench_timespec")

local function now()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
   return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) * 1e-9
end

-- The main Lua state: every thread, for done().
local threads = {}

function setup(thread)
   threads[#threads + 1] = thread
   -- wrk calls the first thread's request() once more, before any connection, to check what
   -- it returns (setup runs before that thread's init, and the check right after it).
   thread:set("checked_by_wrk", #threads == 1)
end

-- Each thread's own Lua state: its request, and its log (a global, for thread:get).
local request_text, sent = nil, nil
bench_log = {}

function init(args)
   -- args[0] is the URL; then what follows it on wrk's command line.
   local file = assert(io.open(args[1], "rb"))
   wrk.method = "POST"
   wrk.body = file:read("*a")
   file:close()
   wrk.headers["Content-Type"] = args[2]
   request_text = wrk.format()
end

local function log(answered, status)
   local n = #bench_log
   bench_log[n + 1], bench_log[n + 2], bench_log[n + 3] = sent, answered, status
end

function request()
   if checked_by_wrk then
      checked_by_wrk = false
      return request_text
   end
   local t = now()
   if sent then
      log(t, -1) -- the last request got no reply: a socket error, and wrk reconnected
   end
   sent = t
   return request_text
end

function response(status, headers, body)
   if sent then
      log(now(), status)
   end
   sent = nil
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'wrk-summary {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, '
         .. '"write": %d, "status": %d, "timeout": %d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout
   ))
   local lines = {}
   for _, thread in ipairs(threads) do
      local t = thread:get("bench_log")
      for i = 1, #t, 3 do
         lines[#lines + 1] = string.format("wrk-request %.6f %.6f %d", t[i], t[i + 1], t[i + 2])
      end
   end
   if #lines > 0 then
      io.write(table.concat(lines, "\n"), "\n")
   end
end
