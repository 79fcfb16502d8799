-- The replicas behind the public front (HAProxy 2.6, Lua 5.3; serve/runtime/front_config.py
-- routes the owner's /v2/trainserve/replicas calls and the metrics port here).
--
-- replica_control, the owner's only (the front checks the admin key first):
--   GET  /v2/trainserve/replicas               each replica: name, address, state (UP,
--                                              DOWN, DRAIN, MAINT; from the health checks
--                                              of backend triton_http), requests in flight
--                                              over every backend, total requests, and
--                                              whether it is local (shared memory)
--   POST /v2/trainserve/replicas/<name>/drain  out of rotation: no new requests, those in
--                                              flight finish (every backend)
--   POST /v2/trainserve/replicas/<name>/ready  back in rotation (once its checks pass)
-- A rollout (serve/client/rollout.py) drains a replica, waits for its requests in flight to
-- end, loads it, waits until it is ready, and puts it back, one replica at a time.
--
-- replica_metrics: every replica's Triton metrics in one page, each sample labelled
-- replica="<name>" (Prometheus sums them over the label for the whole); the targets come
-- in txn.metrics_targets as "r0=HOST:PORT r1=HOST:PORT".

local BACKENDS = {
  "triton_http", "triton_http_large", "triton_http_admin", "triton_http_shm",
  "triton_grpc", "triton_grpc_large", "triton_grpc_admin", "triton_grpc_shm",
}

local function json_string(s)
  return '"' .. tostring(s):gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function servers_named(name)
  local found = {}
  for _, b in ipairs(BACKENDS) do
    local backend = core.backends[b]
    local sv = backend and backend.servers[name]
    if sv then
      found[#found + 1] = sv
    end
  end
  return found
end

local function describe(applet)
  local locals = {}
  for name in (applet:get_var("txn.local_replicas") or ""):gmatch("%S+") do
    locals[name] = true
  end
  local primary = core.backends["triton_http"]
  local rows = {}
  for name, sv in pairs(primary.servers) do
    local st = sv:get_stats()
    local inflight, total = 0, 0
    for _, s in ipairs(servers_named(name)) do
      local x = s:get_stats()
      inflight = inflight + (tonumber(x.scur) or 0)
      total = total + (tonumber(x.stot) or 0)
    end
    rows[#rows + 1] = string.format(
      '{"name":%s,"address":%s,"state":%s,"in_flight":%d,"requests":%d,"check":%s,"local":%s}',
      json_string(name), json_string(sv:get_addr()), json_string(st.status or "?"),
      inflight, total, json_string(st.check_status or ""), tostring(locals[name] == true)
    )
  end
  table.sort(rows)
  return "[" .. table.concat(rows, ",") .. "]"
end

local function reply(applet, status, body)
  applet:set_status(status)
  applet:add_header("content-type", "application/json")
  applet:add_header("content-length", tostring(#body))
  applet:start_response()
  applet:send(body)
end

core.register_service("replica_control", "http", function(applet)
  local path = applet.path or ""
  if path == "/v2/trainserve/replicas" and applet.method == "GET" then
    return reply(applet, 200, describe(applet))
  end
  local name, action = path:match("^/v2/trainserve/replicas/(r%d+)/(%a+)$")
  if not name or applet.method ~= "POST" then
    return reply(applet, 404, '{"error":"GET /v2/trainserve/replicas, or POST .../<name>/drain|ready"}')
  end
  local servers = servers_named(name)
  if #servers == 0 then
    return reply(applet, 404, '{"error":' .. json_string("no replica " .. name) .. "}")
  end
  for _, sv in ipairs(servers) do
    if action == "drain" then
      sv:set_drain()
    elseif action == "ready" then
      sv:set_ready()
    else
      return reply(applet, 400, '{"error":"drain or ready"}')
    end
  end
  return reply(applet, 200, describe(applet))
end)

-- Adds replica="<name>" to every sample of one replica's page and files it under its
-- family (the metric of the last HELP/TYPE line), so that each family stays one group.
local function add_page(families, order, text, name)
  local label = 'replica="' .. name .. '"'
  local family = nil
  for line in text:gmatch("[^\n]+") do
    local kind, metric = line:match("^# (%u+) ([%w_:]+)")
    if kind then
      family = metric
      if not families[family] then
        families[family] = { head = {}, samples = {} }
        order[#order + 1] = family
      end
      local f = families[family]
      if #f.samples == 0 and #f.head < 2 then
        f.head[#f.head + 1] = line
      end
    elseif line:sub(1, 1) ~= "#" then
      local sample, rest = line:match("^([%w_:]+)(.*)$")
      if sample then
        local key = family or sample
        if not families[key] then
          families[key] = { head = {}, samples = {} }
          order[#order + 1] = key
        end
        local s = families[key].samples
        if rest:sub(1, 1) == "{" then
          s[#s + 1] = sample .. "{" .. label .. "," .. rest:sub(2)
        else
          s[#s + 1] = sample .. "{" .. label .. "}" .. rest
        end
      end
    end
  end
end

core.register_service("replica_metrics", "http", function(applet)
  local targets = applet:get_var("txn.metrics_targets") or ""
  local families, order, missing = {}, {}, {}
  for name, addr in targets:gmatch("(r%d+)=(%S+)") do
    local hc = core.httpclient()
    local request = { url = "http://" .. addr .. "/metrics", timeout = 2000 }
    if addr:sub(1, 5) == "unix@" then -- a remote replica, through the stack's egress
      request = { url = "http://replica/metrics", dst = addr, timeout = 2000 }
    end
    local ok, res = pcall(hc.get, hc, request)
    if ok and res and res.status == 200 then
      add_page(families, order, res.body or "", name)
    else
      missing[#missing + 1] = "# replica " .. name .. " (" .. addr .. "): no metrics"
    end
  end
  local lines = {}
  for _, family in ipairs(order) do
    local f = families[family]
    for _, l in ipairs(f.head) do
      lines[#lines + 1] = l
    end
    for _, l in ipairs(f.samples) do
      lines[#lines + 1] = l
    end
  end
  for _, l in ipairs(missing) do
    lines[#lines + 1] = l
  end
  local body = table.concat(lines, "\n") .. "\n"
  applet:set_status(200)
  applet:add_header("content-type", "text/plain; version=0.0.4")
  applet:add_header("content-length", tostring(#body))
  applet:start_response()
  applet:send(body)
end)
