-- Tenant routing: a node serves one tenant (KURA_TENANT_ID, seen as
-- ctx.server_tenant_id). Requests naming another tenant are rejected before
-- any storage work, so a misrouted client gets a clear 403 instead of a miss.
-- HTTP requests must name their tenant; gRPC may omit it (metadata
-- x-kura-tenant-id / x-tuist-account-handle).
--
-- Combine with an authenticate hook of your own; without one every caller is
-- anonymous.

function authorize(ctx, _principal)
  local requested = ctx.tenant_id
  if requested == nil or requested == "" then
    if ctx.transport == "grpc" then return { allow = true } end
    return { deny = { status = 400, message = "Missing tenant_id" } }
  end
  if string.lower(requested) ~= string.lower(ctx.server_tenant_id) then
    return {
      deny = {
        status = 403,
        message = "Forbidden: tenant '" .. requested .. "' is not served by this node",
      },
    }
  end
  return { allow = true }
end
