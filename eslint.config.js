// Lint (`npm run lint`, part of `npm test`): typescript-eslint's recommended rules, and
// for the product's sources two shape limits: no function over 80 lines (blank lines and
// comments not counted) and none with more than 4 parameters (pass an object instead).
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['node_modules/', 'dist/', 'images/', 'guest/', 'test-artifacts/', 'src/ui/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: {
      globals: {
        process: 'readonly',
        console: 'readonly',
        Buffer: 'readonly',
        setTimeout: 'readonly',
        clearTimeout: 'readonly',
        setInterval: 'readonly',
        clearInterval: 'readonly',
        performance: 'readonly',
        URL: 'readonly',
      },
    },
    rules: {
      // TypeScript checks names itself; the rule does not know Node's types.
      'no-undef': 'off',
      // `_x` marks a parameter a signature needs but the body does not.
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' }],
    },
  },
  {
    // Tests, the bench and the reliability scripts read the CLI's --json output, whose
    // shape each of them asserts on the spot.
    files: ['test/**', 'bench/**', 'reliability/**', 'src/**/*.test.ts'],
    rules: { '@typescript-eslint/no-explicit-any': 'off' },
  },
  {
    files: ['src/**/*.ts'],
    ignores: ['src/**/*.test.ts', 'src/testing/**'],
    rules: {
      'max-params': ['error', 4],
      'max-lines-per-function': ['error', { max: 80, skipBlankLines: true, skipComments: true }],
    },
  },
);
