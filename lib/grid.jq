# Turns a run_train_clip.sh config file into lines, per configuration: its name (given, or
# <image>_<text>), image encoder, text encoder, JSON path, the number of flag words, the flag words
# (batch_size: 64 -> "--batch-size", "64"), and "." (so an empty last value is never lost as a trailing
# newline). No value may hold a newline, so each is one line.
# Two layouts: a grid {"image_encoders": [...], "text_encoders": [...], "args": {...}}
#              a list {"defaults": {...}, "configs": [{"name"?, "image_encoder", "text_encoder", ...}]}
# Faults stop with "<JSON path>: <what is wrong>". The launcher's own settings (the output folder, and the
# encoders outside a configuration's own image_encoder/text_encoder) are reserved keys: setting them here
# would move or rename a run behind the launcher's back.
include "json";

def reserved: ["output_dir", "output-dir", "image_encoder", "image-encoder", "text_encoder", "text-encoder"];

def scalar_ok: type == "string" or type == "number" or type == "boolean" or type == "null";

def no_newline($path): if type == "string" and test("[\n\r\u0000]") then fail($path; "must not contain a newline") else . end;

# key: value pairs -> flags: batch_size: 64 -> --batch-size 64; true -> --flag; false/null -> nothing
def flags($obj; $path):
  [$obj | to_entries[] | .key as $k | .value as $v
   | if (reserved | index([$k])) then fail("\($path).\($k)"; "is reserved: the launcher sets \(if ($k | test("output")) then "each configuration's output folder (under CKPT_DIR, --ckpt-dir)" else "the encoders from image_encoders/text_encoders or a configuration's image_encoder/text_encoder" end)")
     elif ($k | test("^[A-Za-z0-9][A-Za-z0-9_.-]*$") | not) then fail("\($path).\($k)"; "is not a usable option name (letters, digits, _ . -)")
     elif ($v | scalar_ok | not) then fail("\($path).\($k)"; "must be a string, number, true, false or null, got \($v | type)")
     else ($v | no_newline("\($path).\($k)"))
     | ("--" + ($k | gsub("_"; "-"))) as $flag
     | if $v == true then $flag elif $v == false or $v == null then empty else $flag, ($v | tostring) end
     end];

def encoders($key):
  if has($key) | not then fail("."; "missing key \"\($key)\"")
  elif (.[$key] | type) != "array" or (.[$key] | length) == 0 then fail(".\($key)"; "must be a non-empty list of names")
  else .[$key] | to_entries[]
    | if (.value | type) != "string" or .value == "" then fail(".\($key)[\(.key)]"; "must be a non-empty string, got \(.value | tojson)")
      else .value | no_newline(".\($key)") end
  end;

def need_name($c; $path; $k):
  if ($c | has($k) | not) then fail($path; "missing key \"\($k)\"")
  elif ($c[$k] | type) != "string" or $c[$k] == "" then fail("\($path).\($k)"; "must be a non-empty string, got \($c[$k] | tojson)")
  else $c[$k] | no_newline("\($path).\($k)") end;

def object_or_empty($path): if . == null then {} elif type == "object" then . else fail($path; "must be an object of option: value") end;

one_document
| if type != "object" then fail("."; "must be a JSON object: a grid (image_encoders, text_encoders, args) or a list (defaults, configs)")
elif has("configs") then
  (.defaults | object_or_empty(".defaults")) as $defaults
  | if (.configs | type) != "array" or (.configs | length) == 0 then fail(".configs"; "must be a non-empty list of configurations")
    else .configs | to_entries[] | .key as $i | .value as $c | ".configs[\($i)]" as $p
    | if ($c | type) != "object" then fail($p; "must be an object with image_encoder and text_encoder") else . end
    | {name: (if ($c | has("name")) then need_name($c; $p; "name") else null end),
       image: need_name($c; $p; "image_encoder"), text: need_name($c; $p; "text_encoder"),
       flags: flags($defaults + ($c | del(.name, .image_encoder, .text_encoder)); $p), where: $p}
    end
elif has("image_encoders") or has("text_encoders") then
  (.args | object_or_empty(".args")) as $args
  | flags($args; ".args") as $flags
  | [encoders("image_encoders")] as $images | [encoders("text_encoders")] as $texts
  | $images[] as $img | $texts[] as $txt
  | {name: null, image: $img, text: $txt, flags: $flags, where: ".image_encoders x .text_encoders"}
else fail("."; "has neither \"configs\" (a list) nor \"image_encoders\"/\"text_encoders\" (a grid)")
end
| (.name // "\(.image)_\(.text)"), .image, .text, .where, (.flags | length), .flags[], "."
