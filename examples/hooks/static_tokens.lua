-- Static bearer tokens: read-only and read-write.
--
--   KURA_EXTENSION_SCRIPT_PATH=/etc/kura/hooks/static_tokens.lua
--   KURA_EXTENSION_STATIC_READ_TOKENS="ro-token-1,ro-token-2"
--   KURA_EXTENSION_STATIC_WRITE_TOKENS="rw-token-1"
--
-- Reads (artifact.read / artifact.inspect / capabilities.read) need any known
-- token; writes and namespace deletes need a read-write token.

local function split(value)
  local out = {}
  for item in string.gmatch(value or "", "[^,%s]+") do out[item] = true end
  return out
end

local READ = split(kura.env("KURA_EXTENSION_STATIC_READ_TOKENS"))
local WRITE = split(kura.env("KURA_EXTENSION_STATIC_WRITE_TOKENS"))

local function bearer(headers)
  local value = headers.authorization
  if value == nil then return nil end
  return string.match(value, "^[Bb]earer%s+(.+)$")
end

function authenticate(ctx)
  local token = bearer(ctx.headers)
  if token == nil then
    return { deny = { status = 401, message = "Missing bearer token" } }
  end
  if WRITE[token] then
    return { principal = { id = "static-write", kind = "token", attributes = { access = "write" } } }
  end
  if READ[token] then
    return { principal = { id = "static-read", kind = "token", attributes = { access = "read" } } }
  end
  return { deny = { status = 401, message = "Invalid token" } }
end

local READ_OPERATIONS = { ["artifact.read"] = true, ["artifact.inspect"] = true, ["capabilities.read"] = true }

function authorize(ctx, principal)
  if READ_OPERATIONS[ctx.operation] then return { allow = true } end
  if principal.attributes.access == "write" then return { allow = true } end
  return { deny = { status = 403, message = "Token is read-only" } }
end
