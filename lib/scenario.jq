# Validates an MGPU_FAKE_GPUS scenario and prints one CSV line per GPU, in index order:
#   index,uuid,utilization,memory_used_mib,memory_total_mib      (utilization NA when null)
# Faults stop with "<JSON path>: <what is wrong>"; py/mgpu/gpus.py applies the same rules.

include "json";

def is_int: type == "number" and . == floor;

# need_int(object; path; key; min; max or null; nullable)
def need_int($o; $p; $k; $lo; $hi; $nullable):
  if ($o | has($k) | not) then fail($p; "missing key \"\($k)\"")
  else $o[$k] as $v
  | if $v == null and $nullable then "NA"
    elif ($v | is_int) and $v >= $lo and ($hi == null or $v <= $hi) then $v
    else fail("\($p).\($k)"; "must be \(if $hi == null then "an integer >= \($lo)" else "an integer from \($lo) to \($hi)" end)\(if $nullable then " or null" else "" end), got \($v | tojson)")
    end
  end;

def need_str($o; $p; $k):
  if ($o | has($k) | not) then fail($p; "missing key \"\($k)\"")
  elif ($o[$k] | type) == "string" and ($o[$k] | test("[,\u0000-\u001f\u007f]")) then fail("\($p).\($k)"; "must not contain a comma or a control character, got \($o[$k] | tojson)")
  elif ($o[$k] | type) == "string" and $o[$k] != "" then $o[$k]
  else fail("\($p).\($k)"; "must be a non-empty string, got \($o[$k] | tojson)")
  end;

def check_process($p):
  if type != "object" then fail($p; "must be an object with pid, name, used_memory_mib")
  else need_int(.; $p; "pid"; 0; null; false), need_str(.; $p; "name"),
    (if has("used_memory_mib") then need_int(.; $p; "used_memory_mib"; 0; null; true) else empty end),
    (if has("user") then need_str(.; $p; "user") else empty end)
  end;

def check_gpu($i):
  ".gpus[\($i)]" as $p
  | if type != "object" then fail($p; "must be an object describing one GPU") else . end
  | need_int(.; $p; "memory_total_mib"; 1; null; false),
    ((.processes // []) | if type != "array" then fail("\($p).processes"; "must be a list")
     else to_entries[] | .key as $k | .value | check_process("\($p).processes[\($k)]") end)
  | empty;

def gpu_line($i):
  ".gpus[\($i)]" as $p | . as $g
  | need_int($g; $p; "memory_total_mib"; 1; null; false) as $total
  | [need_int($g; $p; "index"; 0; null; false), need_str($g; $p; "uuid"), (need_str($g; $p; "name") | empty),
     need_int($g; $p; "utilization_gpu"; 0; 100; true), need_int($g; $p; "memory_used_mib"; 0; $total; false),
     $total]
  | map(tostring) | join(",");

def check_migs($i):
  if (.mig_devices // []) | (type == "array" and all(type == "string" and startswith("MIG-")))
  then empty else fail(".gpus[\($i)].mig_devices"; "must be a list of \"MIG-...\" UUID strings") end;

def unique_key($k):
  [.gpus[][$k]] | (map(tostring) | group_by(.) | map(select(length > 1) | .[0])) as $dupes
  | if ($dupes | length) > 0 then fail(".gpus[].\($k)"; "must be unique, repeated: \($dupes | join(", "))") else empty end;

one_document
| if type != "object" then fail("."; "the top level must be a JSON object with a \"gpus\" list")
elif (.gpus | type) != "array" then fail(".gpus"; "must be a list of GPUs")
else
  (if has("driver_version") then need_str(.; "."; "driver_version") | empty else empty end),
  (if has("cuda_version") then need_str(.; "."; "cuda_version") | empty else empty end),
  (.gpus | to_entries[] | .key as $i | .value | (check_gpu($i), check_migs($i))),
  unique_key("index"), unique_key("uuid"),
  (.gpus | to_entries | sort_by(.value.index)[] | .key as $i | .value | gpu_line($i))
end
