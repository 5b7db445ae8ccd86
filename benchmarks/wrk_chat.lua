-- wrk script: POST one OpenAI chat-completions body to the mock provider.
--   wrk -t1 -c1000 -d10s -s benchmarks/wrk_chat.lua http://127.0.0.1:PORT/v1/chat/completions
-- With WRK_CHECK=1 every reply is also checked (status 200 and the echoed content);
-- that costs wrk CPU, so leave it off when measuring throughput.

local prompt = "prompt 42"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"' .. prompt .. '"}]}'

if os.getenv("WRK_CHECK") then
  local threads = {}

  function setup(thread)
    table.insert(threads, thread)
  end

  function init(args)
    bad_status = 0
    bad_body = 0
  end

  local expected = '"content":"echo: ' .. prompt .. '"'

  function response(status, headers, body)
    if status ~= 200 then
      bad_status = bad_status + 1
    elseif not string.find(body, expected, 1, true) then
      bad_body = bad_body + 1
    end
  end

  function done(summary, latency, requests)
    local s, b = 0, 0
    for _, t in ipairs(threads) do
      s = s + t:get("bad_status")
      b = b + t:get("bad_body")
    end
    io.write(string.format("check: non-200 %d, wrong body %d\n", s, b))
  end
end
