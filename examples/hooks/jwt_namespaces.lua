-- JWT bearer tokens with per-namespace read/write grants.
--
--   KURA_EXTENSION_JWT_VERIFIER_PRIMARY_ALGORITHM=HS256
--   KURA_EXTENSION_JWT_VERIFIER_PRIMARY_SECRET=<shared secret>
--   KURA_EXTENSION_JWT_VERIFIER_PRIMARY_ISSUER=https://auth.example.com   (optional)
--   KURA_EXTENSION_JWT_VERIFIER_PRIMARY_AUDIENCES=kura                   (optional)
--
-- Claims: { sub = "...", exp = ..., grants = { read = {"ios", ...}, write = {"ios", ...} } }
-- A write grant implies read. "*" grants every namespace; the tenant-wide
-- namespace (no namespace_id) is named "" in grants.

function authenticate(ctx)
  local header = ctx.headers.authorization
  if header == nil then
    return { deny = { status = 401, message = "Missing bearer token" } }
  end
  local token = string.match(header, "^[Bb]earer%s+(.+)$")
  local ok, claims = pcall(kura.jwt_verify, "primary", token or "")
  if not ok then
    return { deny = { status = 401, message = "Invalid or expired token" } }
  end
  local grants = claims.grants or {}
  return {
    principal = {
      id = tostring(claims.sub or "unknown"),
      kind = "jwt",
      attributes = { read = grants.read or {}, write = grants.write or {} },
    },
    -- Cache no longer than the token lives.
    ttl_seconds = math.max(0, math.min(600, (claims.exp or 0) - (claims.iat or 0))),
  }
end

local function granted(list, namespace)
  for _, candidate in ipairs(list or {}) do
    if candidate == "*" or candidate == namespace then return true end
  end
  return false
end

local READ_OPERATIONS = { ["artifact.read"] = true, ["artifact.inspect"] = true }

function authorize(ctx, principal)
  if ctx.operation == "capabilities.read" then return { allow = true } end
  local namespace = ctx.namespace_id or ""
  local attributes = principal.attributes
  if granted(attributes.write, namespace) then return { allow = true } end
  if READ_OPERATIONS[ctx.operation] and granted(attributes.read, namespace) then
    return { allow = true }
  end
  return { deny = { status = 403, message = "Forbidden: namespace '" .. namespace .. "' not granted" } }
end
