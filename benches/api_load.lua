-- wrk script for benches/api_load.sh: each connection cycles through lists, triggers and
-- quarantine reads with the key given as the first argument; answers are counted by
-- status and printed at the end (with the latency percentiles wrk measured). A third
-- argument (0-5) sends only that request.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  key = args[1]
  pipelines = tonumber(args[2])
  only = args[3] and tonumber(args[3])
  statuses = {}
  n = 0
end

function request()
  n = n + 1
  local h = { ["Authorization"] = "Bearer " .. key }
  local k = only or n % 6
  if k == 0 then
    return wrk.format("GET", "/v1/pipelines", h)
  elseif k == 1 then
    return wrk.format("GET", "/v1/runs?limit=20", h)
  elseif k == 2 then
    return wrk.format("POST", string.format("/v1/pipelines/p%02d/sync", (n % pipelines) + 1), h)
  elseif k == 3 then
    return wrk.format("GET", "/v1/quarantine?limit=20", h)
  elseif k == 4 then
    return wrk.format("GET", "/v1/quarantine/stats", h)
  else
    return wrk.format("GET", "/v1/dead-letters", h)
  end
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    for status, count in pairs(t:get("statuses")) do
      all[status] = (all[status] or 0) + count
    end
  end
  local server_errors = 0
  for status, count in pairs(all) do
    io.write(string.format("status %d: %d\n", status, count))
    if status >= 500 then server_errors = server_errors + count end
  end
  io.write(string.format("server errors: %d\n", server_errors))
  io.write(string.format("socket errors: connect %d, read %d, write %d, timeout %d\n",
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
  io.write(string.format("requests/s: %.0f\n", summary.requests / (summary.duration / 1e6)))
  for _, p in ipairs({ 50, 90, 99 }) do
    io.write(string.format("p%d ms: %.1f\n", p, latency:percentile(p) / 1000))
  end
end
