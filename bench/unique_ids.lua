-- wrk script: POST the body in $BENCH_BODY with @@ID@@ replaced by an id unique per
-- request (run prefix, thread number, counter), so that every callback is a new job.
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  local file = io.open(os.getenv("BENCH_BODY"), "rb")
  template = file:read("*a")
  file:close()
  run = os.getenv("BENCH_RUN")
  content_type = os.getenv("BENCH_CONTENT_TYPE")
  counter = 0
end

function request()
  counter = counter + 1
  local id = string.format("%s%02d%012d", run, tid, counter)
  local body = (template:gsub("@@ID@@", id))
  return wrk.format("POST", "/callbacks", {["Content-Type"] = content_type}, body)
end
