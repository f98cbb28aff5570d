-- Argo CD health check for Dhad jobs (PretrainJob, SFTJob, RLAIFJob, EvalJob) and Pipelines: one
-- script, used for each kind (docs/install.md shows the argocd-cm keys). Reads status.state, the
-- one-word summary the operator derives from status.conditions, and falls back to the conditions.
-- A Pipeline Succeeds only when every stage and gate did; a failed gate is Degraded naming it.
-- Lua 5.1 (Argo CD runs gopher-lua); only base functions are used.
local hs = { status = "Progressing", message = "Waiting for the Dhad operator" }

local function true_condition(status, kind)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == kind and c.status == "True" then return c end
  end
  return nil
end

-- "Reason: message" of a condition, or the fallback when it says nothing.
local function describe(c, fallback)
  if c == nil then return fallback end
  local text = ""
  if c.reason ~= nil and c.reason ~= "" then text = c.reason end
  if c.message ~= nil and c.message ~= "" then
    if text ~= "" then text = text .. ": " end
    text = text .. c.message
  end
  if text == "" then return fallback end
  return text
end

local status = obj.status
if status == nil then return hs end

local state = status.state
if state == nil or state == "" then
  state = "Pending"
  for _, kind in ipairs({ "Failed", "Succeeded", "Suspended", "Restarting", "Running", "Queued" }) do
    if true_condition(status, kind) ~= nil then
      state = kind
      break
    end
  end
end

if state == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(true_condition(status, "Failed"), "Failed")
  return hs
end
if state == "Succeeded" then
  hs.status = "Healthy"
  hs.message = describe(true_condition(status, "Succeeded"), "Succeeded")
  if status.outputModel ~= nil then hs.message = hs.message .. " (model: " .. status.outputModel .. ")" end
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if state == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(true_condition(status, "Suspended"), "Suspended")
  return hs
end

-- Queued, Pending, Running, Restarting (and any state a newer operator adds): still going.
hs.message = describe(true_condition(status, "Unschedulable"), nil)
  or describe(true_condition(status, state), nil) or state
local detail = ""
if status.stage ~= nil and status.stage ~= "" then detail = "stage " .. status.stage end
if type(status.progress) == "string" then -- a Pipeline: succeeded stages / stages
  if detail ~= "" then detail = detail .. ", " end
  detail = detail .. status.progress .. " stages done"
elseif state == "Running" and status.progress ~= nil and status.progress.step ~= nil then
  if detail ~= "" then detail = detail .. ", " end
  detail = detail .. "step " .. tostring(status.progress.step)
  if status.progress.totalSteps ~= nil then detail = detail .. "/" .. tostring(status.progress.totalSteps) end
end
if detail ~= "" then hs.message = hs.message .. " (" .. detail .. ")" end
return hs
