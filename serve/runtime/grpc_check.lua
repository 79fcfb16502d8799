-- The public front's check of a gRPC ModelInfer request (HAProxy 2.6, Lua 5.3), run on
-- the body that HAProxy holds (the whole message, or its buffer's worth of a larger one:
-- serve/runtime/front_options.py FrontOptions.held_bytes): the gRPC frame
-- (1 flag byte, 4 bytes of length) and the protobuf ModelInferRequest it carries, parsed
-- field by field (serve/runtime/front.py loads it; tests/serve/runtime/test_front.py attacks it).
--
-- Refused, with the reason as the fetch's result ("" = accepted) and the gRPC status in
-- txn.grpc_code:
--   * a shared-memory parameter anywhere in what the buffer shows (PERMISSION_DENIED: an
--     admin-key call; the others INVALID_ARGUMENT);
--   * a model name (field 1, any occurrence: protobuf keeps the last) that is not public
--     (PERMISSION_DENIED);
--   * an input shape (InferInputTensor field 3, packed or not) with a dimension under 0
--     or of 2^31 or more (Triton 2.51 truncates 2^32+1 to 1 and answers; a batch over
--     the max but under 2^31 Triton refuses itself, with its message);
--   * anything the buffer cannot show: a field that runs past the buffer unless it is
--     the tensor data (field 7) that ends exactly where the message ends - so no model
--     name, input or shared-memory parameter can hide after the tensor bytes of a
--     message larger than the buffer;
--   * malformed protobuf (bad varints, wire types, lengths).

local DIM_LIMIT = 2147483648 -- 2^31

local function varint(s, i, j)
  local v, shift = 0, 0
  while i <= j do
    local b = s:byte(i)
    i = i + 1
    if shift > 56 then
      return nil, "a varint longer than 9 bytes"
    end
    v = v | ((b & 0x7f) << shift)
    if b < 0x80 then
      return v, i
    end
    shift = shift + 7
  end
  return nil, "truncated"
end

-- Calls visit(num, wire, value, first, last) for each field of s[i..j]; wire 2 fields get
-- their byte range [first, last] (last may be past j for the top level: see allow_past).
local function each_field(s, i, j, visit, allow_past)
  while i <= j do
    local key, err = varint(s, i, j)
    if not key then
      return err
    end
    i = err
    local num, wire = key >> 3, key & 7
    if wire == 0 then
      local v, nxt = varint(s, i, j)
      if not v then
        return nxt
      end
      i = nxt
      local why = visit(num, 0, v)
      if why then
        return why
      end
    elseif wire == 2 then
      local len, nxt = varint(s, i, j)
      if not len then
        return nxt
      end
      if len < 0 then
        return "a negative length"
      end
      local first, last = nxt, nxt + len - 1
      if last > j then
        if not allow_past or not allow_past(num, last) then
          return "field " .. num .. " runs past the first " .. j .. " bytes the front inspects"
        end
        return visit(num, 2, len, first, last)
      end
      local why = visit(num, 2, len, first, last)
      if why then
        return why
      end
      i = last + 1
    elseif wire == 1 then
      i = i + 8
    elseif wire == 5 then
      i = i + 4
    else
      return "wire type " .. wire
    end
  end
  if i > j + 1 then
    return "truncated"
  end
  return nil
end

-- spec: the public model names, "/"-separated; "@single" where every model has one input;
-- "@owner" for a call with the admin key: any model name, shared-memory parameters allowed
local function parse_spec(spec)
  local t = {}
  for name in string.gmatch(spec or "", "[^/]+") do
    t[name] = true
  end
  return t
end

-- "no such public model: X; public models: a, b" (the names from the spec)
local function not_public(name, spec)
  local public = {}
  for n in string.gmatch(spec or "", "[^/]+") do
    if n:sub(1, 1) ~= "@" then
      public[#public + 1] = n
    end
  end
  return "no such public model: " .. name:sub(1, 64):gsub("[^%w_.-]", "?")
    .. "; public models: " .. table.concat(public, ", ")
end

local SHM_PARAMETER = "shared_memory_region"
local SHM_REFUSED = "shared-memory inputs and outputs need the admin key"
local INVALID_ARGUMENT, PERMISSION_DENIED = 3, 7

local function check(body, spec)
  local limits = parse_spec(spec)
  local n = #body
  if n < 5 then
    return "not a gRPC message"
  end
  if body:byte(1) ~= 0 then
    return "compressed messages are not accepted"
  end
  local b2, b3, b4, b5 = body:byte(2), body:byte(3), body:byte(4), body:byte(5)
  local msg_end = 5 + ((b2 << 24) | (b3 << 16) | (b4 << 8) | b5)
  if n > msg_end then
    return "more than one message in a unary call"
  end
  -- a shared-memory input or output (a parameter named so, anywhere the buffer shows)
  local owner = limits["@owner"] == true -- the admin key's call: names and shm not checked
  local shm = string.find(body, SHM_PARAMETER, 6, true) ~= nil
  if shm and not owner then
    return SHM_REFUSED, PERMISSION_DENIED
  end
  local j = n
  -- every served model has one input ("@single" in the spec): Triton refuses a request
  -- with more inputs before running it, so the unseen rest of such a request is harmless
  local single = limits["@single"] == true
  local model, shapes, tail, raws, code = nil, {}, false, 0, nil
  local function visit_input(num, wire, v, first, last)
    if num ~= 3 then
      return nil
    end
    local dims = shapes[#shapes]
    if wire == 0 then
      dims[#dims + 1] = v
    elseif wire == 2 then
      local i = first
      while i <= last do
        local d, nxt = varint(body, i, last)
        if not d then
          return "input shape: " .. nxt
        end
        dims[#dims + 1] = d
        i = nxt
      end
    end
    return nil
  end
  local function visit_top(num, wire, v, first, last)
    if num == 1 and wire == 2 then
      local name = body:sub(first, last)
      if not owner and not limits[name] then
        code = PERMISSION_DENIED
        return not_public(name, spec)
      end
      model = name
    elseif num == 5 and wire == 2 then
      shapes[#shapes + 1] = {}
      return each_field(body, first, last, visit_input)
    elseif num == 7 then
      raws = raws + 1
    end
    return nil
  end
  local function tensor_data_to_the_end(num, last)
    -- the (last) tensor data runs exactly to the message end; or, where every model has
    -- one input, the data of a request that declared several (refused by Triton)
    tail = num == 7 and (last == msg_end or (single and #shapes >= 2 and raws + 1 < #shapes))
    return tail
  end
  local why = each_field(body, 6, j, visit_top, tensor_data_to_the_end)
  if why then
    return why, code
  end
  if n < msg_end and not tail then
    return "fields past the first " .. j .. " bytes the front inspects (only the tensor data may run on)"
  end
  if not model then
    return "no model name"
  end
  if not owner and model:sub(1, 1) == "@" then
    return "no such public model: " .. model, PERMISSION_DENIED
  end
  -- A batch over the model's max (under 2^31) is left to Triton, which refuses it with
  -- its own message ("batch-size must be <= N") after reading the body.
  for _, dims in ipairs(shapes) do
    for k, d in ipairs(dims) do
      if d < 0 or d >= DIM_LIMIT then
        return "input shape dimension " .. k .. " is " .. d .. " (Triton would truncate it)"
      end
    end
  end
  return ""
end

-- A fetch, not a converter: a converter's string input stops at the first NUL byte (and a
-- gRPC frame starts with one), so it would need the body hex-encoded, which HAProxy does
-- into one buffer (half the body seen) and costs CPU per request; the fetch reads the
-- buffered body as it is (``txn.f:req_body()``, after ``wait-for-body``).
core.register_fetches("grpc_infer_check", function(txn, spec)
  local body = txn.f:req_body() or ""
  if string.find(body, SHM_PARAMETER, 6, true) then
    txn:set_var("txn.shm", 1) -- the owner's request goes where the regions are
  end
  local ok, why, code = pcall(check, body, spec)
  if not ok then
    why, code = "unreadable request (" .. tostring(why) .. ")", INVALID_ARGUMENT
  end
  if why ~= "" then
    -- the gRPC status of the refusal (serve/runtime/front.py answers with it)
    txn:set_var("txn.grpc_code", code or INVALID_ARGUMENT)
  end
  return why
end)

-- The other open methods (ModelReady, ModelMetadata, ModelConfig): their request is a
-- model name (field 1) and a version (field 2), a few bytes. The whole message is parsed,
-- so no name hides anywhere: at most max_bytes, every name public (protobuf keeps the
-- last, so each is checked), the version digits, and nothing else. ServerMetadata,
-- ServerLive and ServerReady carry nothing and are not checked.
local function check_meta(body, spec, max_bytes)
  local public = parse_spec(spec)
  local n = #body
  if n < 5 then
    return "not a gRPC message"
  end
  if body:byte(1) ~= 0 then
    return "compressed messages are not accepted"
  end
  local b2, b3, b4, b5 = body:byte(2), body:byte(3), body:byte(4), body:byte(5)
  local len = (b2 << 24) | (b3 << 16) | (b4 << 8) | b5
  if len > max_bytes then
    return "a " .. len .. "-byte message for a method that takes a model name (at most " .. max_bytes .. ")"
  end
  if n ~= 5 + len then
    return "the message is not one whole gRPC frame"
  end
  local named, code = false, nil
  local why = each_field(body, 6, n, function(num, wire, v, first, last)
    if num == 1 and wire == 2 then
      local name = body:sub(first, last)
      if not public[name] then
        code = PERMISSION_DENIED
        return not_public(name, spec)
      end
      named = true
    elseif num == 2 and wire == 2 then
      if not body:sub(first, last):match("^[0-9]*$") or last - first >= 18 then
        return "a model version is digits"
      end
    else
      return "unexpected field " .. num .. " (a model name and version only)"
    end
    return nil
  end)
  if why then
    return why, code
  end
  if not named then
    return "no model name"
  end
  return ""
end

core.register_fetches("grpc_meta_check", function(txn, spec, max_bytes)
  local ok, why, code = pcall(check_meta, txn.f:req_body() or "", spec, tonumber(max_bytes) or 4096)
  if not ok then
    why, code = "unreadable request (" .. tostring(why) .. ")", INVALID_ARGUMENT
  end
  if why ~= "" then
    txn:set_var("txn.grpc_code", code or INVALID_ARGUMENT)
  end
  return why
end)
