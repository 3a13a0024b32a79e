// Builds the web app into dist/site/ from the locked dependencies: one bundle, no CDN.
import { copyFileSync, mkdirSync } from "node:fs";
import { build } from "esbuild";

mkdirSync("dist/site", { recursive: true });
await build({
  entryPoints: ["src/web/main.ts"],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  minify: true,
  sourcemap: true,
  outfile: "dist/site/app.js",
  logLevel: "warning",
});
for (const file of ["index.html", "style.css"]) copyFileSync(`src/web/${file}`, `dist/site/${file}`);
