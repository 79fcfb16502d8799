-- The public front's deadline for the part of a request body that HAProxy cannot hold
-- (HAProxy 2.6, Lua 5.3; serve/runtime/front_config.py declares it on both public
-- frontends: ``filter lua.body_rate <ms> <bytes/s>``). A request counted by the queue
-- bound arrives whole before anything forwards it (wait-for-body, within the body
-- timeout): this filter then has nothing left to time. A larger one (a batch) is
-- streamed on once HAProxy's buffer is full - to Triton, or to the Lua service that reads
-- a refused message to its end (grpc_check.lua) - and the rest of it gets a deadline:
-- the body timeout plus its size at the least rate, from the request's headers.
-- HAProxy's own timeouts only count the time between two bytes (and an HTTP/2 stream
-- waiting for its client has none), so a sender that drips a byte every few seconds
-- would hold the request, and its place among the few large ones, as long as it liked.
-- The filter is woken at the deadline even when no byte comes (filter.wake_time); past
-- it, the transaction ends (txn:done: the connection is closed, an HTTP/2 stream reset)
-- and Triton drops the part it has.

local BodyRate = {}
BodyRate.id = "trainserve body rate"
BodyRate.flags = filter.FLT_CFG_FL_HTX
BodyRate.__index = BodyRate

local function now_ms()
  local t = core.now()
  return t.sec * 1000 + t.usec // 1000
end

-- self: the filter as declared (its arguments, set below); one instance per stream
function BodyRate:new()
  local f = { base_ms = self.base_ms, rate = self.rate, start = now_ms(), cut = false }
  return setmetatable(f, BodyRate)
end

function BodyRate:start_analyze(txn, chn)
  if not chn:is_resp() then
    filter.register_data_filter(self, chn)
  end
  return filter.CONTINUE
end

function BodyRate:http_payload(txn, msg)
  if self.cut then
    return 0
  end
  if not self.deadline then
    -- the first bytes forwarded: the request's checks are done and its size is known
    -- (txn.body_total: Content-Length, or the gRPC frame's length + 5)
    local total = tonumber(txn:get_var("txn.body_total")) or 0
    self.deadline = self.start + self.base_ms + (total * 1000) // self.rate
  end
  local left = self.deadline - now_ms()
  if left <= 0 then
    self.cut = true
    txn:set_var("txn.body_cut", 1)
    -- a filter cannot answer a request whose body is still coming: it ends the
    -- transaction (returning -1 instead makes HAProxy 2.6 spin on the stream and abort)
    txn:done()
    return 0
  end
  filter.wake_time(left)
  return msg:input()
end

core.register_filter("body_rate", BodyRate, function(flt, args)
  flt.base_ms = tonumber(args[1]) or 10000
  flt.rate = math.max(1, tonumber(args[2]) or 262144)
  return flt
end)
